"""Functions that tests run in a fresh subprocess via `run_in_subprocess("child_functions:...")`."""


def allocate(mebibytes: int) -> dict:
    block = bytearray(mebibytes * 2**20)
    for i in range(0, len(block), 4096):  # touch every page so it is resident
        block[i] = 1
    print("noise on stdout must not corrupt the result")
    return {"allocated": len(block)}


def fail(message: str) -> None:
    raise ValueError(message)


def die(status: int) -> None:
    import os

    os._exit(status)
