"""What `agpo eval --model` accepts, and how each kind gets into vLLM.

* an HF model folder (config.json + weights): vLLM loads it as is;
* a Megatron checkpoint step folder (a trainer save, `step_000040/`, or an `hf_to_megatron`
  output; a run's `checkpoint.save_dir` means its newest complete step): vLLM starts from the
  config.json and tokenizer stored with the checkpoint (`agpo_meta.json`, `hf_assets/`) with dummy
  weights, and the checkpoint's parameters are streamed in through the bridge, one parameter at a
  time, as the exporter reads them (`checkpoints_conversion/megatron_to_hf.py`). Nothing is
  exported to disk.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch


class ModelSourceError(ValueError):
    """A `--model` that is missing or of no kind we read (one line, naming it)."""


@dataclass(frozen=True)
class ModelSource:
    path: Path
    """The HF folder, or the checkpoint step folder."""
    kind: str
    """"hf" or "megatron"."""


def resolve_source(spec: str) -> ModelSource:
    """Classify `--model spec` without importing Megatron or vLLM."""
    from agpo_megatron.checkpoint.step_dirs import newest_complete

    path = Path(spec)
    if not path.exists():
        raise ModelSourceError(f"--model {spec}: no such file or directory")
    if not path.is_dir():
        raise ModelSourceError(f"--model {spec}: not a folder (an HF model folder or a checkpoint step folder)")
    if (path / "config.json").is_file():
        return ModelSource(path, "hf")
    if (path / "metadata.json").is_file() and (path / ".metadata").is_file():
        return ModelSource(path, "megatron")
    newest = newest_complete(path)
    if newest is not None:  # a run's save_dir: its newest complete step
        return ModelSource(Path(newest), "megatron")
    raise ModelSourceError(
        f"--model {spec}: neither an HF model folder (config.json) nor a Megatron checkpoint step folder "
        "(metadata.json and .metadata) nor a save_dir with a complete step"
    )


def checkpoint_shell(ckpt: Path, shell: Path) -> Path:
    """Write the HF folder vLLM starts from for a checkpoint: its stored config.json and assets
    (tokenizer, generation_config), no weights. Returns `shell`."""
    from agpo_megatron.checkpoint import metadata
    from agpo_megatron.checkpoint.hf_assets import copy_hf_assets

    meta = metadata.read_meta(ckpt)
    if meta is None or meta.hf_config is None:
        raise ModelSourceError(
            f"--model {ckpt}: no HF config stored with this checkpoint ({metadata.SIDECAR} with hf_config); "
            "export it with megatron_to_hf --hf-config-from <HF model dir>"
        )
    shell.mkdir(parents=True, exist_ok=True)
    (shell / "config.json").write_text(json.dumps(meta.hf_config, indent=2))
    if (ckpt / metadata.ASSETS_DIR).is_dir():
        copy_hf_assets(ckpt / metadata.ASSETS_DIR, shell)
    return shell


def checkpoint_weights(ckpt: Path, *, verify: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's parameters as full HF-named tensors, one parameter at a time (needs a
    Megatron world at TP=1/PP=1; any saved layout). As `megatron_to_hf` reads them: verified
    against the sidecar's checksums, matched against the stored config first."""
    from agpo_megatron.bridge import names
    from agpo_megatron.checkpoint import CheckpointError, convert_io, metadata
    from agpo_megatron.models.hf_config import arch_from_hf_dict

    if verify:
        metadata.verify_checkpoint(ckpt)
    meta = metadata.read_meta(ckpt)
    assert meta is not None and meta.hf_config is not None  # checkpoint_shell checked it
    arch = arch_from_hf_dict(meta.hf_config, str(ckpt / metadata.SIDECAR))
    stored = metadata.stored_tensors(ckpt)
    if "embedding.word_embeddings.weight" not in stored:
        raise CheckpointError(f"{ckpt}: no 'embedding.word_embeddings.weight': not a GPT model checkpoint")
    store_dtype = str(stored["embedding.word_embeddings.weight"][1]).removeprefix("torch.")
    reader = convert_io.ParamReader(ckpt, convert_io.abstract_model(arch, store_dtype), verify=False)
    for rule in names.param_rules(arch, "local"):
        full = reader.get(rule.megatron)
        for hf_name, t in zip(rule.hf, names.megatron_to_hf(rule, full, arch)):
            # A copy: the reader reuses its buffer, and vLLM may hold a tensor until its module is complete.
            yield hf_name, t.clone()
