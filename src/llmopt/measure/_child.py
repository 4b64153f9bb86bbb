"""Entry point of `run_in_subprocess`: `python -m llmopt.measure._child IN.json OUT.json`.

IN holds {"fn": "module:function", "kwargs": {...}, "sys_path": [...]}. The child calls the function
with the kwargs, then writes {"ok", "result", "fn_wall_s", "peak_rss_bytes"} (or {"ok": false, "error",
"traceback"}) to OUT. The result goes through a file, not stdout, so whatever the function prints
cannot corrupt it. Peak RSS is read at the very end, after the function returned. This module imports
no torch: `llmopt` and `llmopt.measure` import lazily, so the child's peak is the function's own.
"""

from __future__ import annotations

import importlib
import json
import resource
import sys
import time
import traceback


def _vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # the kernel writes kB
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int:
    """High-water resident memory of this process in bytes (VmHWM on Linux, else ru_maxrss).

    Lives here, free of torch, so the child measures only what the called function imports.
    """
    hwm = _vm_hwm_bytes()
    if hwm is not None:
        return hwm
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024  # bytes on macOS, KiB on Linux


def _main(in_path: str, out_path: str) -> int:
    with open(in_path) as f:
        spec = json.load(f)
    for entry in reversed(spec.get("sys_path", [])):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    out: dict = {"ok": False}
    code = 1
    try:
        module_name, _, fn_name = spec["fn"].partition(":")
        fn = getattr(importlib.import_module(module_name), fn_name)
        start = time.perf_counter()
        result = fn(**spec.get("kwargs", {}))
        out = {"ok": True, "result": result, "fn_wall_s": time.perf_counter() - start}
        code = 0
    except BaseException as e:  # noqa: BLE001 - everything the function raises goes back to the parent
        message = " ".join(f"{type(e).__name__}: {e}".split())
        out = {"ok": False, "error": message, "traceback": traceback.format_exc()}
        traceback.print_exc()
    out["peak_rss_bytes"] = peak_rss_bytes()
    try:
        text = json.dumps(out)
    except (TypeError, ValueError) as e:
        text = json.dumps({"ok": False, "error": f"result is not JSON-serializable: {e}",
                           "peak_rss_bytes": out["peak_rss_bytes"]})
        print(f"result is not JSON-serializable: {e}", file=sys.stderr)
        code = 1
    with open(out_path, "w") as f:
        f.write(text)
    return code


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m llmopt.measure._child IN.json OUT.json")
    sys.exit(_main(sys.argv[1], sys.argv[2]))
