"""The one way this project exports a model to ONNX: ``torch.export`` of a module, then ``torch.onnx.export`` of
that program, written to a folder named after the model's checksum, so that one model's export is found again
(the forward engine and the decoders share a work folder) and another model's never is."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
from torch import nn


def model_checksum(model: nn.Module) -> str:
    """SHA-256 of a model's arguments and every tensor of its state (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256(json.dumps(getattr(model.params, "__dict__", {}), sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_folder(workdir: Path, model: nn.Module) -> Path:
    """The work folder's subfolder for this model's exports (created)."""
    folder = Path(workdir) / f"model-{model_checksum(model)[:16]}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def to_onnx(module: nn.Module, args: tuple, dynamic_shapes, input_names, output_names, path: Path) -> Path:
    """``module`` called with ``args`` as an ONNX file at ``path`` (kept if it is there already: exports are
    deterministic, and the folder is the model's own)."""
    if path.is_file():
        return path
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # export first, then convert: torch.onnx.export's own call turns a tuple of shapes into a list
        program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes)
        onnx = torch.onnx.export(
            program, dynamo=True, input_names=list(input_names), output_names=list(output_names), verbose=False
        )
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save(str(tmp))
    tmp.replace(path)  # a file that is there is whole
    return path


def ort_session(path: Path, device: torch.device):
    """The one ONNX Runtime set-up of the project (the forward engine and the decoder alike): CUDA's provider
    first where the device is a GPU and ONNX Runtime has it, and on the CPU the process's one thread setting,
    as torch's (``torch.set_num_threads``), so engines compared side by side use the same cores."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(str(path), options, providers=providers)
