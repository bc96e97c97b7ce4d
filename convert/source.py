"""Read a sentence-transformers model directory into a plain description of its pipeline.

Why a description first: the export, the ONNX head and the manifest all need the same facts
(pooling mode, Dense layers, prompts, max length), and a model we cannot fully reproduce in the
artifact must be refused here, before minutes of export work, with a message naming the module.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class SourceError(ValueError):
    """The source is missing, not a sentence-transformers model, or uses something we can't export."""


SUPPORTED_ARCHITECTURES = {
    "bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "camembert",
    "albert", "deberta", "deberta-v2", "nomic_bert", "modernbert", "gemma3_text", "gemma3",
}
POOLING_MODES = {"mean", "cls", "lasttoken", "max"}
IDENTITY_ACTIVATIONS = {"torch.nn.modules.linear.Identity", "torch.nn.Identity", "Identity"}
TANH_ACTIVATIONS = {"torch.nn.modules.activation.Tanh", "torch.nn.Tanh", "Tanh"}

#: Matryoshka dims of models known to be trained for them (the configs don't say so).
KNOWN_MATRYOSHKA = {
    ("gemma3_text", 768): [768, 512, 256, 128],
}


@dataclass(frozen=True)
class DenseLayer:
    weight: np.ndarray  # (out, in), as torch.nn.Linear stores it
    bias: np.ndarray | None
    activation: str  # "identity" | "tanh"


@dataclass(frozen=True)
class SentenceTransformerSource:
    """Everything the artifact must reproduce, read from the model directory."""

    path: Path
    source_id: str
    revision: str
    model_type: str
    architecture: str
    transformer_dir: Path
    hidden_size: int
    pooling: str
    dense: list[DenseLayer]
    normalize: bool
    max_seq_length: int
    do_lower_case: bool
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None

    @property
    def dim(self) -> int:
        return self.dense[-1].weight.shape[0] if self.dense else self.hidden_size

    def matryoshka_dims(self) -> list[int]:
        known = KNOWN_MATRYOSHKA.get((self.model_type, self.dim))
        return list(known) if known else [self.dim]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict | list):
        raise SourceError(f"{path} does not hold a JSON object")
    return data


def resolve_source(source: str, revision: str | None = None, cache_dir: Path | None = None) -> tuple[Path, str]:
    """Turn SOURCE (a local directory or a hub id such as ``google/embeddinggemma-300m``) into a path.

    Hub ids download with ``huggingface_hub`` (honours ``HF_TOKEN`` for gated models such as
    Gemma). Returns the directory and a revision string for the manifest.
    """
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceError(f"{source} is a file, not a sentence-transformers model directory")
        return path.resolve(), revision or "local"
    looks_like_hub_id = source.count("/") == 1 and not source.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise SourceError(f"{source}: no such directory (and not a hub id like 'org/name')")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        raise SourceError("downloading from the hub needs huggingface_hub (pip install '.[convert]')") from None
    try:
        local = snapshot_download(source, revision=revision, cache_dir=cache_dir,
                                  token=os.environ.get("HF_TOKEN") or None)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise SourceError(
            f"{source}: no such local directory, and downloading it from the hub failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "Gated models need HF_TOKEN; offline machines need a local directory."
        ) from None
    return Path(local), revision or Path(local).name


def _load_dense(directory: Path) -> DenseLayer:
    config = _read_json(directory / "config.json")
    activation = config.get("activation_function", "torch.nn.modules.linear.Identity")
    if activation in IDENTITY_ACTIVATIONS:
        act = "identity"
    elif activation in TANH_ACTIVATIONS:
        act = "tanh"
    else:
        raise SourceError(f"{directory}: Dense activation {activation!r} is not supported (Identity, Tanh)")
    weights: dict[str, np.ndarray]
    if (directory / "model.safetensors").is_file():
        from safetensors.numpy import load_file

        weights = load_file(str(directory / "model.safetensors"))
    elif (directory / "pytorch_model.bin").is_file():
        import torch

        state = torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
        weights = {k: v.float().numpy() for k, v in state.items()}
    else:
        raise SourceError(f"{directory}: Dense layer has no model.safetensors or pytorch_model.bin")
    weight = weights.get("linear.weight")
    if weight is None:
        raise SourceError(f"{directory}: Dense weights lack 'linear.weight'")
    bias = weights.get("linear.bias")
    expected = (config.get("out_features"), config.get("in_features"))
    if tuple(weight.shape) != expected:
        raise SourceError(f"{directory}: Dense weight shape {weight.shape} != config {expected}")
    return DenseLayer(weight=weight.astype(np.float32), bias=None if bias is None else bias.astype(np.float32),
                      activation=act)


def _pooling_mode(config: dict, directory: Path) -> str:
    if isinstance(config.get("pooling_mode"), str):  # sentence-transformers >= 5 format
        chosen = [{"cls_token": "cls", "mean_tokens": "mean", "max_tokens": "max"}.get(
            config["pooling_mode"], config["pooling_mode"])]
    else:  # older format: one boolean flag per mode
        flags = {
            "cls": config.get("pooling_mode_cls_token", False),
            "mean": config.get("pooling_mode_mean_tokens", False),
            "max": config.get("pooling_mode_max_tokens", False),
            "lasttoken": config.get("pooling_mode_lasttoken", False),
            "mean_sqrt_len": config.get("pooling_mode_mean_sqrt_len_tokens", False),
            "weightedmean": config.get("pooling_mode_weightedmean_tokens", False),
        }
        chosen = [k for k, v in flags.items() if v]
    if len(chosen) != 1:
        raise SourceError(f"{directory}: pooling must use exactly one mode, found {chosen or 'none'}")
    if chosen[0] not in POOLING_MODES:
        raise SourceError(f"{directory}: pooling mode {chosen[0]!r} is not supported ({sorted(POOLING_MODES)})")
    if config.get("include_prompt") is False:
        raise SourceError(f"{directory}: pooling with include_prompt=false is not supported")
    return chosen[0]


def read_source(path: Path, source_id: str | None = None, revision: str = "local") -> SentenceTransformerSource:
    """Read and check a sentence-transformers directory; refuse what the artifact can't reproduce."""
    path = Path(path)
    if not path.is_dir():
        raise SourceError(f"{path}: no such directory")
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        raise SourceError(
            f"{path} is not a sentence-transformers model directory (no modules.json). "
            "Give the folder that holds modules.json, config.json and the tokenizer."
        )
    modules = _read_json(modules_file)
    if not isinstance(modules, list) or not modules:
        raise SourceError(f"{modules_file} lists no modules")
    transformer_dir: Path | None = None
    pooling: str | None = None
    dense: list[DenseLayer] = []
    normalize = False
    for module in sorted(modules, key=lambda m: m.get("idx", 0)):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        mpath = path / module.get("path", "")
        if kind == "Transformer":
            if transformer_dir is not None or pooling is not None:
                raise SourceError(f"{modules_file}: Transformer must be the first and only transformer module")
            transformer_dir = mpath
        elif kind == "Pooling":
            pooling = _pooling_mode(_read_json(mpath / "config.json"), mpath)
        elif kind == "Dense":
            if pooling is None:
                raise SourceError(f"{modules_file}: Dense before Pooling is not supported")
            dense.append(_load_dense(mpath))
        elif kind == "Normalize":
            normalize = True
        else:
            raise SourceError(f"{modules_file}: module type {module.get('type')!r} is not supported "
                              "(Transformer, Pooling, Dense, Normalize)")
    if transformer_dir is None or pooling is None:
        raise SourceError(f"{modules_file}: a Transformer and a Pooling module are required")
    config = _read_json(transformer_dir / "config.json")
    model_type = str(config.get("model_type", ""))
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise SourceError(
            f"{transformer_dir / 'config.json'}: architecture {model_type!r} is not supported "
            f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})"
        )
    if not (transformer_dir / "tokenizer.json").is_file():
        raise SourceError(f"{transformer_dir}: tokenizer.json is missing (a fast tokenizer is required)")
    hidden = int(config.get("hidden_size") or config.get("dim") or 0)
    st_config = {}
    for name in ("sentence_bert_config.json", "sentence_xlnet_config.json"):
        if (transformer_dir / name).is_file():
            st_config = _read_json(transformer_dir / name)
            break
    max_len = st_config.get("max_seq_length")
    if not max_len and (transformer_dir / "tokenizer_config.json").is_file():
        tok_max = _read_json(transformer_dir / "tokenizer_config.json").get("model_max_length")
        if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
            max_len = tok_max
    max_len = max_len or config.get("max_position_embeddings") or 512
    dims_chain = hidden
    for layer in dense:
        if layer.weight.shape[1] != dims_chain:
            raise SourceError(f"{path}: Dense input {layer.weight.shape[1]} does not follow previous dim {dims_chain}")
        dims_chain = layer.weight.shape[0]
    prompts: dict[str, str] = {}
    default_prompt = None
    cst = path / "config_sentence_transformers.json"
    if cst.is_file():
        data = _read_json(cst)
        prompts = {str(k): str(v) for k, v in (data.get("prompts") or {}).items()}
        default_prompt = data.get("default_prompt_name")
        if default_prompt is not None and default_prompt not in prompts:
            raise SourceError(f"{cst}: default_prompt_name {default_prompt!r} is not among its prompts")
    architectures = config.get("architectures") or [model_type]
    return SentenceTransformerSource(
        path=path,
        source_id=source_id or str(path),
        revision=revision,
        model_type=model_type,
        architecture=str(architectures[0]),
        transformer_dir=transformer_dir,
        hidden_size=hidden,
        pooling=pooling,
        dense=dense,
        normalize=normalize,
        max_seq_length=int(max_len),
        do_lower_case=bool(st_config.get("do_lower_case", False)),
        prompts=prompts,
        default_prompt_name=default_prompt,
    )
