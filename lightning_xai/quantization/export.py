"""Packed export: integer weights at their real bit widths + per-channel exponents, in a safetensors file.

File layout (all tensors little-endian, no pickle; ``safetensors.torch.load_file`` reads it):

* ``lxai.packed`` (uint8): one bit stream with every quantized layer, channel-major; channel ``c`` stores its
  codes as unsigned ``code + 2^(k_c-1)`` in ``k_c`` bits each (LSB first). 0-bit channels store nothing.
* ``lxai.bits`` (uint8): ``k_c`` of every channel of every quantized layer, in layer order.
* ``lxai.exponents`` (float32): ``e_c`` of every channel with ``k_c > 0``.
* ``lxai.bias_flags`` (uint8, bit-packed): for layers with a bias, one bit per channel: alive (``b > 0``)?
* ``lxai.bias`` (float32): the bias of every alive channel (layers that have a bias).
* every other parameter and buffer under its plain state-dict name.
* metadata ``lightning_xai``: JSON with the format version, the layers (name, shape, has bias) and all shapes.

Loading gives weights ``2^e · code`` computed with the same float32 operations as the quantizer, so the reloaded
plain model's outputs equal the quantized model's outputs exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_xai.quantization.install import batchnorm_gates, quantized_layers
from lightning_xai.quantization.size import plain_state_items
from lightning_xai.quantization.ste import bits_needed, quantize_to_int

__all__ = ["export_compressed", "read_compressed", "load_compressed", "pack_codes", "unpack_codes", "FORMAT"]

FORMAT = "lightning_xai.packed/2"  # /2: with a payload checksum; /1 files (no checksum) are still read
_OLD_FORMATS = ("lightning_xai.packed/1",)
_META_KEY = "lightning_xai"
DIGEST_KEY = "lightning_xai.sha256"


def payload_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes, in name order) and every metadata entry but the digest
    itself: a single flipped byte anywhere in what the file means changes it."""
    h = hashlib.sha256()
    for key in sorted(k for k in metadata if k != DIGEST_KEY):
        h.update(f"{key}\0{metadata[key]}\0".encode())
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        h.update(f"{key}\0{t.dtype}\0{list(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def verify_digest(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str | os.PathLike[str], required: bool
) -> None:
    """Raise ``ValueError`` ("corrupted") when the file's checksum is missing (``required``) or does not match."""
    stored = metadata.get(DIGEST_KEY)
    if stored is None:
        if required:
            raise ValueError(f"{os.fspath(path)!r} is corrupted: its checksum entry is missing")
        return
    if stored != payload_digest(tensors, metadata):
        raise ValueError(
            f"{os.fspath(path)!r} is corrupted: its content does not match the SHA-256 checksum stored in it "
            "(a changed or truncated byte); re-export the model"
        )


def pack_codes(codes: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Bit stream (uint8 array of 0/1) of ``codes`` (``(C, n)`` ints), channel ``c`` at ``widths[c]`` bits."""
    codes = np.asarray(codes, dtype=np.int64)
    codes = codes.reshape(codes.shape[0], int(np.prod(codes.shape[1:])))
    widths = np.asarray(widths, dtype=np.int64)
    kmax = int(widths.max()) if widths.size else 0
    if kmax == 0 or codes.shape[1] == 0:
        return np.zeros(0, dtype=np.uint8)
    offset = np.where(widths > 0, np.left_shift(1, np.maximum(widths - 1, 0)), 0)[:, None]
    unsigned = codes + offset
    if (unsigned < 0).any() or (unsigned >= np.left_shift(1, widths)[:, None]).any():
        raise ValueError("a code does not fit the width given for its channel")
    shifts = np.arange(kmax, dtype=np.int64)
    bits = (unsigned[:, :, None] >> shifts) & 1  # (C, n, kmax)
    mask = np.broadcast_to(shifts[None, None, :] < widths[:, None, None], bits.shape)
    return bits[mask].astype(np.uint8)


def unpack_codes(stream: np.ndarray, widths: np.ndarray, per_channel: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``(C, per_channel)`` int64 codes from a 0/1 bit stream."""
    widths = np.asarray(widths, dtype=np.int64)
    channels = widths.shape[0]
    kmax = int(widths.max()) if widths.size else 0
    out = np.zeros((channels, per_channel), dtype=np.int64)
    if kmax == 0 or per_channel == 0:
        return out
    shifts = np.arange(kmax, dtype=np.int64)
    mask = np.broadcast_to(shifts[None, None, :] < widths[:, None, None], (channels, per_channel, kmax))
    full = np.zeros((channels, per_channel, kmax), dtype=np.int64)
    full[mask] = stream
    unsigned = (full << shifts).sum(axis=2)
    offset = np.where(widths > 0, np.left_shift(1, np.maximum(widths - 1, 0)), 0)[:, None]
    return unsigned - offset


def _umask() -> int:
    """The process umask, read without changing it where the platform tells it (``/proc``); else set and reset."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:  # pragma: no cover - not Linux
        pass
    mask = os.umask(0o022)  # pragma: no cover
    os.umask(mask)  # pragma: no cover
    return mask  # pragma: no cover


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    """Write a safetensors file so that ``path`` is either the old file or the complete new one: a temporary file in
    the same folder, flushed to disk (``fsync``), then renamed over ``path`` (and the folder entry flushed too). The
    file gets the permissions a plain ``open()`` would give (``0o666`` minus the umask), not the temporary's 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = dict(metadata)
    metadata[DIGEST_KEY] = payload_digest(tensors, metadata)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # the rename itself survives a crash only once the folder is flushed (not possible on every platform)
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(dir_fd)
    except OSError:  # pragma: no cover - file systems that refuse fsync on folders
        pass
    finally:
        os.close(dir_fd)


def read_tagged(
    path: str | os.PathLike[str], expected_format: str, what: str, old_formats: tuple[str, ...] = ()
) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors and the metadata of a safetensors file whose metadata ``format`` is ``expected_format`` (checksum
    verified) or one of ``old_formats`` (written before files had one).

    Raises ``ValueError`` naming ``path`` for unreadable (truncated, foreign, corrupted) files and for other formats.
    """
    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 - safe_open has no items()
    except Exception as err:  # noqa: BLE001 - safetensors raises several error types for bad files
        raise ValueError(
            f"`path`={os.fspath(path)!r} is not a readable safetensors file (truncated or corrupted?): {err}"
        ) from err
    if meta.get("format") not in (expected_format, *old_formats):
        if DIGEST_KEY in meta:  # one of ours, with a damaged format entry
            verify_digest(tensors, meta, path, required=True)
        raise ValueError(f"`path`={os.fspath(path)!r} is not a lightning_xai {what} (format {meta.get('format')!r})")
    verify_digest(tensors, meta, path, required=meta.get("format") == expected_format)
    return tensors, meta


def export_compressed(model: nn.Module, path: str | os.PathLike[str]) -> int:
    """Write ``model`` (with quantizers installed) as a packed file; returns its size in bytes.

    The write is atomic: an interrupted export never leaves a truncated file at ``path``.

    Example:
        >>> import tempfile, os
        >>> from lightning_xai.quantization.install import install_quantizers
        >>> net = nn.Linear(8, 3)
        >>> _ = install_quantizers(net, init_bits=4)
        >>> d = tempfile.mkdtemp()
        >>> export_compressed(net, os.path.join(d, "m.safetensors")) > 0
        True
    """
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("`model` has no quantizers installed; call install_quantizers() or use SelfCompression first")
    for layer in layers:  # before anything is written
        q = layer.quantizer
        for what, t in (("weights", layer.original), ("bit depths", q.b), ("exponents", q.e)):
            if not bool(torch.isfinite(t.detach()).all()):
                raise ValueError(
                    f"layer {layer.qualified!r} has non-finite {what} (NaN or Inf): the training diverged; nothing "
                    "was written (lower the learning rates or γ, or export an earlier checkpoint)"
                )
    streams: list[np.ndarray] = []
    widths_all: list[np.ndarray] = []
    exps: list[torch.Tensor] = []
    biases: list[torch.Tensor] = []
    flags: list[np.ndarray] = []
    meta_layers: list[dict[str, Any]] = []
    handled: set[str] = set()
    for layer in layers:
        original = layer.original.detach().cpu().float()
        q = layer.quantizer
        codes, _ = quantize_to_int(original, q.b.detach().cpu().float(), q.e.detach().cpu().float())
        k = bits_needed(codes)
        stored = k > 0
        flat = codes.flatten(1).to(torch.int64).numpy()
        streams.append(pack_codes(flat, k.numpy()))
        widths_all.append(k.numpy().astype(np.uint8))
        exps.append(q.e.detach().cpu().float()[stored])
        entry: dict[str, Any] = {"name": layer.qualified, "shape": list(original.shape), "bias": None}
        handled.add(layer.qualified)
        if layer.bias is not None:
            bias_name = f"{layer.name}.{layer.bias}" if layer.name else layer.bias
            alive = q.alive().cpu()
            biases.append(layer.bias_original.detach().cpu().float()[alive])  # type: ignore[union-attr]
            flags.append(alive.numpy().astype(np.uint8))
            entry["bias"] = bias_name
            handled.add(bias_name)
        meta_layers.append(entry)
    stream = np.concatenate(streams) if streams else np.zeros(0, dtype=np.uint8)
    packed = np.packbits(stream, bitorder="little") if stream.size else np.zeros(0, dtype=np.uint8)
    tensors: dict[str, torch.Tensor] = {
        "lxai.packed": torch.from_numpy(packed.copy()),
        "lxai.bits": torch.from_numpy(np.concatenate(widths_all)),
        "lxai.exponents": torch.cat(exps) if exps else torch.zeros(0),
        "lxai.bias": torch.cat(biases) if biases else torch.zeros(0),
        "lxai.bias_flags": torch.from_numpy(
            np.packbits(np.concatenate(flags), bitorder="little") if flags else np.zeros(0, dtype=np.uint8)
        ),
    }
    shapes: dict[str, list[int]] = {}
    # Gated batch norms: dead channels must output zero after reload too -> store weight = bias = 0 there.
    gated: dict[str, torch.Tensor] = {}
    for name, _bn, quantizer in batchnorm_gates(model):
        gated[name] = ~quantizer.alive().cpu()
    for key, value in plain_state_items(model).items():
        shapes[key] = list(value.shape)
        if key in handled:
            continue
        tensor = value.detach().cpu().clone().contiguous()
        owner, _, attr = key.rpartition(".")
        if owner in gated and attr in ("weight", "bias") and tensor.shape == gated[owner].shape:
            tensor[gated[owner]] = 0
        tensors[key] = tensor
    for layer in meta_layers:
        layer["shape"] = shapes.get(layer["name"], layer["shape"])
    from lightning_xai.pruning.surgery import original_shapes

    metadata = {
        _META_KEY: json.dumps(
            {"format": FORMAT, "layers": meta_layers, "shapes": shapes, "original_shapes": original_shapes(model)}
        )
    }
    target = Path(path)
    _atomic_save(tensors, metadata, target)
    return target.stat().st_size


def read_compressed(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a packed file into a plain float state dict (dequantized) and its metadata.

    Raises:
        ValueError: if the file is not a lightning_xai packed file, or it is truncated or corrupted.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`path`={str(path)!r} does not exist")
    try:
        raw = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            file_meta = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"{str(path)!r} is not a readable lightning_xai packed file (truncated or corrupted?): {err}"
        ) from None
    if _META_KEY not in file_meta:
        if DIGEST_KEY in file_meta:
            verify_digest(raw, file_meta, path, required=True)
        raise ValueError(f"{str(path)!r} has no lightning_xai metadata; it was not written by export_compressed()")
    try:
        meta = json.loads(file_meta[_META_KEY])
    except json.JSONDecodeError:
        verify_digest(raw, file_meta, path, required=True)
        raise ValueError(f"{str(path)!r} is corrupted: its metadata is not valid JSON") from None
    if meta.get("format") not in (FORMAT, *_OLD_FORMATS):
        verify_digest(raw, file_meta, path, required=DIGEST_KEY in file_meta)
        raise ValueError(f"{str(path)!r} has format {meta.get('format')!r}; this version reads {FORMAT!r}")
    verify_digest(raw, file_meta, path, required=meta.get("format") == FORMAT)
    stream = np.unpackbits(raw["lxai.packed"].numpy(), bitorder="little")
    widths = raw["lxai.bits"].numpy().astype(np.int64)
    exps = raw["lxai.exponents"]
    biases = raw["lxai.bias"]
    bias_flags = np.unpackbits(raw["lxai.bias_flags"].numpy(), bitorder="little").astype(bool)
    flag_pos = 0
    state: dict[str, torch.Tensor] = {}
    bit_pos = ch_pos = exp_pos = bias_pos = 0
    try:
        for layer in meta["layers"]:
            shape = layer["shape"]
            channels = shape[0]
            per_channel = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            k = widths[ch_pos : ch_pos + channels]
            if k.shape[0] != channels:
                raise ValueError("bit-width table too short")
            nbits = int((k * per_channel).sum())
            if bit_pos + nbits > stream.shape[0]:
                raise ValueError("packed stream too short")
            codes = unpack_codes(stream[bit_pos : bit_pos + nbits], k, per_channel)
            stored = torch.from_numpy(k > 0)
            n_stored = int(stored.sum())
            if exps[exp_pos : exp_pos + n_stored].numel() != n_stored:
                raise ValueError("exponent table too short")
            e = torch.zeros(channels)
            e[stored] = exps[exp_pos : exp_pos + n_stored]
            scale = torch.exp2(e).reshape((-1,) + (1,) * (len(shape) - 1))
            state[layer["name"]] = scale * torch.from_numpy(codes).float().reshape(shape)
            if layer["bias"] is not None:
                alive = torch.from_numpy(bias_flags[flag_pos : flag_pos + channels].copy())
                if alive.numel() != channels:
                    raise ValueError("bias flags too short")
                n_alive = int(alive.sum())
                if biases[bias_pos : bias_pos + n_alive].numel() != n_alive:
                    raise ValueError("bias table too short")
                b = torch.zeros(channels)
                b[alive] = biases[bias_pos : bias_pos + n_alive]
                state[layer["bias"]] = b
                bias_pos += n_alive
                flag_pos += channels
            bit_pos += nbits
            ch_pos += channels
            exp_pos += n_stored
    except ValueError as err:
        raise ValueError(f"{str(path)!r} is corrupted: {err}") from None
    for key, value in raw.items():
        if not key.startswith("lxai."):
            state[key] = value
    missing = set(meta["shapes"]) - set(state)
    if missing:
        raise ValueError(f"{str(path)!r} is corrupted: tensors {sorted(missing)[:5]} are missing")
    return state, meta


def load_compressed(path: str | os.PathLike[str], model: nn.Module) -> nn.Module:
    """Load a packed file into ``model``: a freshly built, *unquantized* instance of the exported architecture (the
    LightningModule or its inner ``nn.Module``).

    Layers whose channels were removed are resized to the stored shapes first; a model of another architecture
    (class count, widths) is refused with a clear error. Returns ``model``.
    """
    from lightning_xai._loading import load_into

    if quantized_layers(model):
        raise ValueError("`model` must be a plain model without quantizers (the packed file holds dequantized weights)")
    state, meta = read_compressed(path)
    load_into(model, state, path, meta.get("original_shapes"))
    return model
