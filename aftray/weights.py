"""The policy's weights as an object-store payload: what a train worker puts and a rollout engine loads.

A state dict travels as {name: (numpy array, torch dtype name)}: Ray stores numpy arrays without pickling them
and a reader on the same node maps them zero-copy, where pickled torch tensors cost seconds for SmolLM2-135M.
bf16 has no numpy type and travels as its int16 bits. Tensors that share storage (a tied LM head) travel once,
under the first name; `tied` lists the others, so a reader can serve them or skip them.
"""
from __future__ import annotations

import warnings


def to_payload(state_dict: dict) -> dict:
    """{"arrays": {name: (array, dtype)}, "tied": {name: name it shares storage with}}."""
    import torch

    arrays, tied, first = {}, {}, {}
    for name, t in state_dict.items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key in first:
            tied[name] = first[key]
            continue
        first[key] = name
        t = t.detach().cpu().contiguous()
        arrays[name] = ((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy(), str(t.dtype))
    return {"arrays": arrays, "tied": tied}


def from_payload(payload: dict, with_tied: bool = True) -> dict:
    """The state dict back as torch tensors (read-only views of the payload's arrays: copy out of them)."""
    import torch

    with warnings.catch_warnings():  # store arrays are read-only; readers only copy out of them
        warnings.simplefilter("ignore", UserWarning)
        out = {name: torch.from_numpy(a).view(getattr(torch, dtype.removeprefix("torch.")))
               for name, (a, dtype) in payload["arrays"].items()}
    if with_tied:
        out.update({name: out[source] for name, source in payload["tied"].items()})
    return out


def put_weights(state_dict: dict):
    """The state dict into Ray's object store; returns its ref (the caller owns it)."""
    import ray

    return ray.put(to_payload(state_dict))
