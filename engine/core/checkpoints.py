"""Loading safetensors checkpoints without trusting the configuration stored beside their tensors.

A checkpoint's configuration (a predictor's JSON header, a digits model's ``arch``) decides how large the
module built to receive its tensors is. Built as written, a tampered ``"hidden": 10**9`` allocates gigabytes
before any check runs. :func:`check_shapes` builds the module on the ``meta`` device (no memory), compares
every parameter and buffer shape with the file's header (read without loading a tensor) and refuses any
difference; only then does the caller build the real module, which is therefore never larger than the
tensors the file holds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules import module as module_hooks


def checkpoint_file(path: str | Path, what: str) -> Path:
    """``path`` as a regular file, or a clear error: missing, a directory, or not a regular file (a FIFO
    or device would block or stream forever)."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise ValueError(f"{what} {path} cannot be read ({e.strerror})") from e
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"{what} {path} is a directory, not a file")
    if not stat.S_ISREG(mode):
        raise ValueError(f"{what} {path} is not a regular file (a pipe, socket or device cannot be loaded)")
    return path


_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
             "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def stored_tensors(path: str | Path) -> tuple[dict[str, tuple[int, ...]], int]:
    """Every tensor's shape in a safetensors file and the bytes they hold, read from its header alone."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118 - not a dict
            shapes = {k: tuple(v.get_shape()) for k, v in slices.items()}
            nbytes = sum(math.prod(shapes[k]) * _ITEMSIZE.get(v.get_dtype(), 8) for k, v in slices.items())
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from e
    return shapes, nbytes


def check_shapes(build: Callable[[], nn.Module], shapes: dict[str, tuple[int, ...]], what: str,
                 nbytes: int | None = None) -> None:
    """Refuse (``ValueError``) a configuration whose module would not hold exactly ``shapes``.

    ``build`` is called under ``torch.device("meta")``, so even an absurd configuration allocates nothing,
    and is stopped as soon as it registers far more modules and tensors than the file holds (a
    ``num_blocks`` of 10**5 is refused in milliseconds); any exception it raises is reported as an invalid
    configuration of ``what``. Buffers that are not saved (positional tables and the like) are counted too:
    the whole module may hold at most twice what the file holds (plus 4096 elements) -- in bytes when
    ``nbytes`` (the file's, :func:`stored_tensors`) is given, so a file re-saved in a narrower dtype cannot
    stretch the bound.
    """
    budget, count, me = 4 * len(shapes) + 64, 0, threading.get_ident()

    def count_registration(*_: object) -> None:  # stops a build that outgrows the file at once
        nonlocal count
        if threading.get_ident() == me:
            count += 1
            if count > budget:
                raise ValueError(f"it builds more than {budget} modules and tensors, the file holds "
                                 f"{len(shapes)} tensors")

    registries = (module_hooks.register_module_module_registration_hook,
                  module_hooks.register_module_parameter_registration_hook,
                  module_hooks.register_module_buffer_registration_hook)
    hooks = [register(count_registration) for register in registries]
    try:
        with torch.device("meta"):
            module = build()
            want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
            tensors = (*module.parameters(), *module.buffers())
            built = sum(t.numel() * (t.element_size() if nbytes is not None else 1) for t in tensors)
    except Exception as e:  # noqa: BLE001 - whatever a hostile configuration makes a constructor raise
        raise ValueError(f"{what} has an invalid configuration ({type(e).__name__}: {e})") from e
    finally:
        for h in hooks:
            h.remove()
    if nbytes is None:
        stored, unit, slack = sum(math.prod(s) for s in shapes.values()), "elements", 4096
    else:
        stored, unit, slack = nbytes, "bytes", 4096 * 8
    if want == shapes and built <= 2 * stored + slack:
        return
    if want == shapes:  # buffers that are not saved (e.g. positional tables) grow with the configuration
        raise ValueError(f"{what}: its configuration builds {built} {unit} (buffers derived from the "
                         f"configuration included), more than twice the {stored} {unit} its tensors hold")
    missing, extra = sorted(set(want) - set(shapes)), sorted(set(shapes) - set(want))
    if missing or extra:
        raise ValueError(f"{what}: its configuration does not match its tensors (missing {missing[:4]}, "
                         f"unexpected {extra[:4]})")
    name = next(k for k in sorted(want) if want[k] != shapes[k])
    raise ValueError(f"{what}: its configuration does not match its tensors ({name} should be "
                     f"{list(want[name])} by the configuration, the file holds {list(shapes[name])})")


def state_checksum(tensors: dict[str, torch.Tensor], config: dict) -> str:
    """SHA-256 over a configuration (canonical JSON) and every tensor's name and bytes: what a file's
    checksum must cover, so that an edited configuration is detected like a flipped weight."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(t.view(torch.int16).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes())
    return h.hexdigest()


__all__ = ["check_shapes", "checkpoint_file", "state_checksum", "stored_tensors"]
