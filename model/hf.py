"""Weights as transformers writes them: safetensors in F32, BF16 or F16, one file or sharded.

The safetensors library parses and checks each file's header and offsets (``deserialize``); numpy
and ``ml_dtypes`` turn the bytes into arrays (numpy has no bfloat16, so ``safetensors.numpy``
cannot read the files every Qwen2 release ships). Weights are read in the dtype they were saved in
and widened exactly to float32; a checkpoint whose tensors do not match its config is refused, and so
is one whose config.json ``dtype`` would round a stored value: transformers 5.x casts the weights to
that dtype as it loads them (4.x read them as stored), so such a file is two models.
"""
from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, deserialize
from safetensors.numpy import save_file

from ptxgen.files import read_file, why

from .config import ConfigError, ModelConfig, read_json, unique_keys
from .generation_config import Sampling, read_generation_config
from .hf_config import HFConfig, check_stop_tokens, parse_hf_config
from .params import over_layers, param_shapes

# safetensors dtype name -> numpy dtype, for the dtypes a checkpoint's weights may be stored in
STORED = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16)}
CONFIG_DTYPES = {"float32": STORED["F32"], "bfloat16": STORED["BF16"], "float16": STORED["F16"]}  # config.json's names
# --save-dtype -> (safetensors name, config.json name)
SAVE_DTYPES = {"fp32": ("F32", "float32"), "bf16": ("BF16", "bfloat16")}
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
ROTARY = ".self_attn.rotary_emb.inv_freq"  # a buffer older transformers versions saved
MASTER = "master.safetensors"  # this project's f32 weights beside a model.safetensors saved narrower


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged or does not match its config; one line for the user."""


def read_config(path: Path) -> HFConfig:
    try:
        return parse_hf_config(read_json(path / "config.json"))
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def weight_files(path: Path) -> dict[Path, set[str] | None]:
    """Each weight file of a checkpoint with the tensor names its index assigns it (None: unsharded)."""
    if (path / SINGLE).is_file():
        return {path / SINGLE: None}
    if not (path / INDEX).is_file():
        raise CheckpointError(f"{path} has no {SINGLE} and no {INDEX}")
    try:
        index = read_json(path / INDEX)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{path / INDEX}: no weight_map of tensor names to file names")
    files: dict[Path, set[str] | None] = {}
    for name, file in weight_map.items():
        if Path(file).name != file:  # a shard named by the index lives beside it, nowhere else
            raise CheckpointError(f"{path / INDEX}: shard {file!r} is not a file name")
        names = files.setdefault(path / file, set())
        assert names is not None
        names.add(name)
    return files


def read_tensors(file: Path) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file, in its stored dtype (F32, BF16 or F16)."""
    try:
        data = read_file(file)
        raw = deserialize(data)
        # the library keeps the last of two header entries for one name, as Python's json does (a
        # checked header, so its length prefix is sound): a name given twice is damage, not a choice
        json.loads(data[8:8 + int.from_bytes(data[:8], "little")], object_pairs_hook=unique_keys)
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {file}: {why(e)}") from None
    out = {}
    for name, t in raw:
        if t["dtype"] not in STORED:
            raise CheckpointError(f"{file}: {name} is stored as {t['dtype']}; weights must be F32, BF16 or F16")
        out[name] = np.frombuffer(t["data"], dtype=STORED[t["dtype"]]).reshape(t["shape"])
    return out


def read_weights(path: Path, hf: HFConfig | None = None) -> dict[str, np.ndarray]:
    """All weight tensors of a checkpoint directory, widened exactly to float32, each of whose values
    ``hf``'s dtype holds exactly (``check_config_dtype``).

    Beside a narrower model.safetensors, this project keeps the f32 masters (``MASTER``): they are
    the weights, and they must round to exactly what model.safetensors holds (else one of the two
    was replaced or damaged since, and which one is right cannot be told)."""
    stored: dict[str, np.ndarray] = {}
    for file, expected in weight_files(path).items():
        tensors = read_tensors(file)
        if expected is not None and set(tensors) != expected:
            odd = sorted(set(tensors) ^ expected)[0]
            raise CheckpointError(f"{file} does not hold what {INDEX} says (first difference: {odd})")
        for name, t in tensors.items():
            if name in stored:
                raise CheckpointError(f"{name} is stored twice ({file.name} and another shard)")
            if hf is not None:
                check_config_dtype(hf, name, t, file)
            stored[name] = t
    if (path / MASTER).is_file():
        masters = read_tensors(path / MASTER)
        for name in sorted(set(masters) | set(stored)):
            m, t = masters.get(name), stored.get(name)
            if m is None or t is None or m.shape != t.shape or not np.array_equal(
                    m.astype(t.dtype).astype(np.float32), t.astype(np.float32), equal_nan=True):
                raise CheckpointError(f"{path}: {MASTER} and the model weights disagree at {name} "
                                      "(one of them was replaced or damaged)")
        stored = masters
    weights = {name: t.astype(np.float32) for name, t in stored.items()}
    for name, w in weights.items():
        if not np.isfinite(w).all():
            raise CheckpointError(f"{path}: {name} holds non-finite values (NaN or infinity)")
    return weights


def check_config_dtype(hf: HFConfig, name: str, stored: np.ndarray, file: Path) -> None:
    """transformers 5.x loads a checkpoint in its config's dtype (``dtype="auto"``), casting each stored
    tensor; this project reads the stored values exactly. The two agree when the cast is exact (a
    widening, or values the narrower dtype holds): otherwise one line naming the key and the file."""
    to = CONFIG_DTYPES.get(hf.dtype) if hf.dtype is not None else None
    if to is None or to == stored.dtype or to == STORED["F32"] or name.endswith(ROTARY):  # (inv_freq: not loaded)
        return
    wide = stored.astype(np.float32)
    with np.errstate(over="ignore"):  # (out of range: infinity, which then differs)
        exact = np.array_equal(wide.astype(to).astype(np.float32), wide, equal_nan=True)
    if not exact:
        kind = next(k for k, dt in STORED.items() if dt == stored.dtype)
        raise CheckpointError(f"{file.parent / 'config.json'}: {hf.dtype_key} = {hf.dtype!r}: {file.name} stores "
                              f"{name} in {kind} with values {hf.dtype} cannot hold; transformers 5.x rounds them "
                              f"as it loads, this project reads them as stored: say the stored dtype, or save the "
                              f"weights in {hf.dtype}")


def model_params(config: ModelConfig, weights: dict[str, np.ndarray], path: Path,
                 zero_biases_exported: bool = False) -> dict[str, np.ndarray]:
    """The model's parameters from a checkpoint's tensors, checked name by name against the config.

    A tied model may also store ``lm_head.weight`` (transformers 4.x did); it must then equal the
    embedding. ``zero_biases_exported``: this project's older bias-free checkpoints wrote zeros.
    """
    weights = dict(weights)
    tensors = over_layers(config, len)  # counted at once: a config may say a billion layers, and the names below
    if tensors > 2 * len(weights):      # are made only for a count the checkpoint's own bounds
        raise CheckpointError(f"config/weights mismatch in {path}: the config names {tensors} tensors "
                              f"({config.num_layers} layers), the checkpoint holds {len(weights)}")
    expected = param_shapes(config)
    if config.tie_word_embeddings and "lm_head.weight" in weights:
        head = weights.pop("lm_head.weight")
        embed = weights.get("model.embed_tokens.weight")
        if embed is None or head.shape != embed.shape or not np.array_equal(head, embed):
            raise CheckpointError(f"{path}: tie_word_embeddings is true but lm_head.weight differs from "
                                  "model.embed_tokens.weight")
    for name in [n for n in weights if n.endswith(ROTARY)]:
        check_rotary_buffer(config, name, weights.pop(name), path)
    if zero_biases_exported:
        for name in [n for n in weights if n.endswith(".bias") and n not in expected]:
            if np.any(weights.pop(name)):
                raise CheckpointError(f"config/weights mismatch in {path}: {name} is not zero but the config "
                                      "has no Q/K/V bias")
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        hint = " (the config says no Q/K/V bias)" if not missing and extra[0].endswith(".bias") else ""
        raise CheckpointError(f"config/weights mismatch in {path}: {what}{hint} "
                              f"({len(missing)} missing, {len(extra)} unexpected)")
    for name, shape in expected.items():
        if weights[name].shape != shape:
            raise CheckpointError(f"config/weights mismatch in {path}: {name} has shape {weights[name].shape}, "
                                  f"config says {shape}")
    return {name: weights[name] for name in expected}


def check_rotary_buffer(config: ModelConfig, name: str, stored: np.ndarray, path: Path) -> None:
    """Older transformers saved each layer's RoPE ``inv_freq`` buffer: it must say the config's theta.

    A checkpoint whose buffer and config disagree is the theta bug this project exists for, written
    down in the file itself; it is refused, not resolved in favour of either."""
    from ptxgen.kernels.rope import inverse_frequencies

    expected = inverse_frequencies(config.head_dim, config.rope_theta)
    layer = name.split(".")[2]
    if not layer.isdigit() or int(layer) >= config.num_layers:
        raise CheckpointError(f"{path}: {name} belongs to no layer of a {config.num_layers}-layer model")
    # saved in f32 as torch computed it, or in the model's f16 / bf16 after a cast: within 2 units
    # in the last place of the narrowest dtype whose values it holds
    narrow = next((dt for dt in (np.float16, ml_dtypes.bfloat16) if stored.shape == expected.shape
                   and np.array_equal(stored.astype(dt).astype(np.float32), stored)), None)
    if narrow is not None:
        info = np.finfo(narrow)
        rtol, atol = 2 * float(info.eps), 2 * float(info.smallest_subnormal)
        expected = expected.astype(narrow).astype(np.float64)
    else:
        rtol, atol = 1e-5, 0.0
    if stored.shape != expected.shape or not np.allclose(stored, expected, rtol=rtol, atol=atol):
        raise CheckpointError(f"{path}: {name} is not the RoPE frequencies of rope_theta "
                              f"{config.rope_theta:g} and head_dim {config.head_dim}")


def generation_defaults(path: Path, hf: HFConfig) -> Sampling:
    """generation_config.json's decoding defaults (config.json's eos ids only without that file)."""
    try:
        sampling = read_generation_config(path / "generation_config.json", hf.eos_token_ids)
        check_stop_tokens(sampling.eos_token_ids, hf.config.vocab_size, "eos_token_id")
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return sampling


def write_weights(file: Path, tensors: dict[str, np.ndarray], save_dtype: str) -> None:
    """Write float32 ``tensors`` as one safetensors file in ``save_dtype`` (fp32 or bf16, rounded
    to nearest even), with the metadata transformers expects."""
    stored, _ = SAVE_DTYPES[save_dtype]
    out: dict[str, np.ndarray] = {}
    for name, t in tensors.items():
        out[name] = np.ascontiguousarray(t, dtype=np.float32).astype(STORED[stored])
        if not np.isfinite(out[name].astype(np.float32)).all():
            raise CheckpointError(f"{name} does not fit in {save_dtype} (non-finite after rounding)")
    save_tensors(file, out, metadata={"format": "pt"})  # bf16 through ml_dtypes: safetensors >= 0.8


def save_tensors(file: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """``safetensors.numpy.save_file``, whose write failures (a full disk) are its own SafetensorError: an
    OSError here, as every other failed write is (it was a traceback)."""
    try:
        save_file(tensors, str(file), metadata=metadata)
    except SafetensorError as e:
        raise OSError(f"cannot write {file}: {e}") from None
