"""Packed export: integer weights at their real bit widths + per-channel exponents, in a safetensors file.

File layout (all tensors little-endian, no pickle; ``safetensors.torch.load_file`` reads it):

* ``lxai.packed`` (uint8): the codes of every quantized layer, channel-major; 0-bit channels store nothing. Two
  codings (metadata ``coding``):

  - ``"bits"`` (format ``/2``): one bit stream, channel ``c`` storing unsigned ``code + 2^(k_c-1)`` in ``k_c`` bits
    each (LSB first). Its size is exactly what :func:`~lightning_xai.quantization.size.size_report` accounts.
  - ``"lzma"`` (format ``/3``): the codes zigzag-mapped (``0, -1, 1, -2, … → 0, 1, 2, 3, …``: the same symbol for
    the same code in every channel, whatever its width) one per byte (``code_bytes`` = 2 or 4 little-endian bytes
    when some ``k_c`` exceeds 8), compressed with LZMA (the ``.xz`` container of Python's standard library). Trained
    codes are far from uniform (most sit near zero), so this entropy coding stores them in fewer than ``k_c`` bits
    each, as Deep Compression's Huffman stage does; it is lossless.

  ``export_compressed(coding="auto")`` (the default) writes whichever is smaller.
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
import lzma
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

__all__ = [
    "export_compressed",
    "read_compressed",
    "load_compressed",
    "pack_codes",
    "unpack_codes",
    "FORMAT",
    "FORMAT_LZMA",
    "CODINGS",
]

FORMAT = "lightning_xai.packed/2"  # /2: with a payload checksum; /1 files (no checksum) are still read
FORMAT_LZMA = "lightning_xai.packed/3"  # /3: the codes entropy-coded with LZMA (older readers refuse it cleanly)
_OLD_FORMATS = ("lightning_xai.packed/1",)
CODINGS = ("auto", "bits", "lzma")
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


_CODE_DTYPES = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4")}  # "lzma" coding: bytes per code


def _code_bytes(widths: np.ndarray) -> int:
    """Bytes per stored code in the ``"lzma"`` coding: the fewest of 1, 2, 4 that hold the widest channel."""
    kmax = int(widths.max()) if widths.size else 0
    return 1 if kmax <= 8 else 2 if kmax <= 16 else 4


def lzma_codes(codes: list[np.ndarray], widths: list[np.ndarray]) -> tuple[bytes, int]:
    """The ``"lzma"`` coding of every layer's ``(C, n)`` codes: the zigzag map of the codes of the channels with
    ``k_c > 0``, channel-major, ``code_bytes`` little-endian bytes each, LZMA-compressed. Returns the bytes and
    ``code_bytes``."""
    every = np.concatenate(widths) if widths else np.zeros(0, dtype=np.int64)
    nbytes = _code_bytes(every)
    dtype = _CODE_DTYPES[nbytes]
    parts = []
    for flat, k in zip(codes, widths):
        k = k.astype(np.int64)
        c = flat[k > 0]
        parts.append(np.where(c >= 0, 2 * c, -2 * c - 1).astype(dtype).reshape(-1))  # zigzag: < 2^k_c
    raw = np.concatenate(parts).tobytes() if parts else b""
    # CHECK_NONE: the file's SHA-256 already covers these bytes
    return lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE), nbytes


def _unlzma(blob: bytes, count: int, nbytes: int) -> np.ndarray:
    """Decode ``count`` codes of ``nbytes`` bytes from an ``"lzma"`` stream (never more: a crafted stream cannot
    make the reader allocate beyond what the bit-width table announces)."""
    if nbytes not in _CODE_DTYPES:
        raise ValueError(f"unknown code width {nbytes!r} bytes")
    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    try:
        raw = decoder.decompress(blob, max_length=count * nbytes)
    except lzma.LZMAError as err:
        raise ValueError(f"the LZMA code stream does not decode ({err})") from None
    if len(raw) != count * nbytes:
        raise ValueError("LZMA code stream too short")
    if not decoder.eof and decoder.decompress(b"", max_length=1):
        raise ValueError("LZMA code stream longer than its bit-width table announces")
    return np.frombuffer(raw, dtype=_CODE_DTYPES[nbytes]).astype(np.int64)


def _from_zigzag(unsigned: np.ndarray, widths: np.ndarray, per_channel: int) -> np.ndarray:
    """``(C, per_channel)`` signed codes from the zigzag codes of the channels with ``k_c > 0`` (others are 0)."""
    rows = widths > 0
    if unsigned.shape[0] != int(rows.sum()) * per_channel:
        raise ValueError("LZMA code stream too short")
    out = np.zeros((widths.shape[0], per_channel), dtype=np.int64)
    block = unsigned.reshape(int(rows.sum()), per_channel)
    if (block >= np.left_shift(1, widths[rows])[:, None]).any():
        raise ValueError("a code does not fit the width given for its channel")
    out[rows] = np.where(block % 2 == 0, block // 2, -(block + 1) // 2)
    return out


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


def export_compressed(model: nn.Module, path: str | os.PathLike[str], coding: str = "auto") -> int:
    """Write ``model`` (with quantizers installed) as a packed file; returns its size in bytes.

    ``coding``: ``"bits"`` (every code in its channel's bit width; the size :func:`size_report` predicts),
    ``"lzma"`` (the codes entropy-coded, see the module docstring) or ``"auto"`` (whichever file is smaller, so never
    larger than ``"bits"``). The write is atomic: an interrupted export never leaves a truncated file at ``path``.

    Example:
        >>> import tempfile, os
        >>> from lightning_xai.quantization.install import install_quantizers
        >>> net = nn.Linear(8, 3)
        >>> _ = install_quantizers(net, init_bits=4)
        >>> d = tempfile.mkdtemp()
        >>> export_compressed(net, os.path.join(d, "m.safetensors")) > 0
        True
    """
    if not isinstance(coding, str) or coding not in CODINGS:
        raise ValueError(f"`coding` must be one of {CODINGS}, got {coding!r}")
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
    all_codes: list[np.ndarray] = []
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
        all_codes.append(flat)
        if coding != "lzma":
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
    packed = np.zeros(0, dtype=np.uint8)
    if coding != "lzma":
        stream = np.concatenate(streams) if streams else np.zeros(0, dtype=np.uint8)
        packed = np.packbits(stream, bitorder="little") if stream.size else packed
    chosen: dict[str, Any] = {"coding": "bits"}
    if coding != "bits":
        blob, nbytes = lzma_codes(all_codes, widths_all)
        if coding == "lzma" or len(blob) < packed.size:
            packed = np.frombuffer(blob, dtype=np.uint8)
            chosen = {"coding": "lzma", "code_bytes": nbytes}
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

    fmt = FORMAT_LZMA if chosen["coding"] == "lzma" else FORMAT
    metadata = {
        _META_KEY: json.dumps(
            {
                "format": fmt,
                **chosen,
                "layers": meta_layers,
                "shapes": shapes,
                "original_shapes": original_shapes(model),
            }
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
    if meta.get("format") not in (FORMAT, FORMAT_LZMA, *_OLD_FORMATS):
        verify_digest(raw, file_meta, path, required=DIGEST_KEY in file_meta)
        raise ValueError(
            f"{str(path)!r} has format {meta.get('format')!r}; this version reads {FORMAT!r} and {FORMAT_LZMA!r}"
        )
    verify_digest(raw, file_meta, path, required=meta.get("format") in (FORMAT, FORMAT_LZMA))
    widths = raw["lxai.bits"].numpy().astype(np.int64)
    lzma_coded = meta.get("format") == FORMAT_LZMA
    if lzma_coded:
        try:
            count, pos = 0, 0
            for layer in meta["layers"]:  # codes announced by the bit-width table: stored channels x their size
                channels = layer["shape"][0]
                count += int((widths[pos : pos + channels] > 0).sum()) * int(np.prod(layer["shape"][1:]))
                pos += channels
            unsigned_all = _unlzma(raw["lxai.packed"].numpy().tobytes(), count, int(meta.get("code_bytes", 0)))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{str(path)!r} is corrupted: {err}") from None
        stream = np.zeros(0, dtype=np.uint8)
    else:
        stream = np.unpackbits(raw["lxai.packed"].numpy(), bitorder="little")
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
            if lzma_coded:  # bit_pos counts codes here
                nbits = int((k > 0).sum()) * per_channel
                codes = _from_zigzag(unsigned_all[bit_pos : bit_pos + nbits], k, per_channel)
            else:
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
