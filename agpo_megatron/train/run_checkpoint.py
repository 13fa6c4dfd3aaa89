"""What a resumable run saves at a step, and how it continues from it.

A step checkpoint (`checkpoint/step_dirs.py` has the folder layout and the commit protocol) holds:

    <torch_dist files, checkpoint/>    actor weights, distributed-optimizer state, LR scheduler
    rng/rank_NNNNN.pt                   each rank's RNG states: torch CPU, CUDA (when present),
                                        Megatron's tracker, python `random`, numpy
    run_state.json                      step, sampler position, kl_coef and eps, the A-GRPO
                                        controllers, the Reference's source, the layout, the config

Exact resume: the step-(N+1) rollout seeds derive from (parallel.seed, step, prompt index) only
(`Session.train_sampling`, `replicas.request_seed`), and each `generate` starts from an empty
prefix cache, so a resumed step samples what the uninterrupted run sampled. Everything else the
next step reads is in the checkpoint. The evaluation before step 1 is not repeated on resume.

The Reference (the KL anchor) is the policy the run started from, recorded as a source:
{'kind': 'hf', 'path': HF dir}, {'kind': 'megatron', 'path': dist checkpoint}. Weights that have no
path of their own (an in-memory warm start, as in the demo, or a random init) are saved once into
`save_dir/initial_weights` and recorded as that path. A resumed run rebuilds the Reference from
this source, never from the resumed actor.

Departures / limits:
- Resuming needs the saving run's TP and PP (the distributed optimizer's 'dp_reshardable' state
  reshards over DP only; see docs/checkpoints.md). RNG states are restored only at the same world size.
- The LR schedule (optim.*, algo.ppo_epochs, optimizer steps per rollout) must match: Megatron's
  scheduler refuses a checkpoint whose schedule differs. `steps` may grow (extending a finished
  run): freely when the LR does not depend on the horizon (constant after warm-up), with
  `optim.override_schedule=true` when it does (Megatron-LM's --override-opt_param-scheduler: the
  schedule continues from the saved optimizer step with the new length). A step is one rollout,
  however many optimizer steps it makes (batch.prompts_per_update).
- A changed seed, training data or rollout size is refused (the saved data position would mean
  other prompts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from agpo_megatron.algo.controllers import ClipController, KLController
from agpo_megatron.checkpoint import CheckpointError, step_dirs
from agpo_megatron.checkpoint.metadata import add_checksums, verify_collective
from agpo_megatron.checkpoint.rng import RNG_DIR, rng_file, rng_state, set_rng_state
from agpo_megatron.config.schema import TrainConfig
from agpo_megatron.config.yaml_io import ConfigError, to_dict
from agpo_megatron.report.console import console
from agpo_megatron.report.redact import redact
from agpo_megatron.runtime.parallel import Layout
from agpo_megatron.train.resume_checks import check_compatible

FORMAT = 1
SKIP_HINT = "checkpoint.verify=false"
"""How a user of `agpo train` loads a checkpoint whose checksums do not match."""


def say(msg: str) -> None:
    """One line from rank 0, on the console (also when library output goes to a log file)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[agpo] {msg}", file=console(), flush=True)


def _broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _read_run_state(folder: Path) -> dict[str, Any]:
    file = folder / step_dirs.COMPLETE_MARKER
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{file}: unreadable ({e}); resume from an earlier step folder (checkpoint.resume=<path>)"
        ) from None


# ---- choosing what to resume from --------------------------------------------------------------


def find_resume(cfg: TrainConfig) -> Path | None:
    """The step folder `checkpoint.resume` designates (None: start fresh). Rank 0's view of the filesystem."""
    ck = cfg.checkpoint
    if ck.resume == "never" or (ck.resume == "auto" and not ck.save_dir):
        return None
    if ck.resume == "auto":
        return step_dirs.newest_complete(ck.save_dir)
    path = Path(ck.resume)
    if not step_dirs.is_complete(path):  # a save_dir: its newest complete step
        newest = step_dirs.newest_complete(path)
        if newest is None:
            raise ConfigError(
                f"checkpoint.resume={ck.resume}: neither a run checkpoint (no "
                f"{step_dirs.COMPLETE_MARKER}) nor a save_dir holding one"
            )
        path = newest
    return path


class RunCheckpointer:
    """Saves and restores everything the loop needs to continue bit-exactly. Collective: every
    method runs on every rank, in the same order."""

    def __init__(
        self,
        cfg: TrainConfig,
        layout: Layout,
        actor,
        sampler,
        kl_ctl: KLController,
        clip_ctl: ClipController,
        resident: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
    ):
        """`resident()`: a context in which the actor's state is in memory (it may be offloaded between
        steps, see train/colocate.py); saves run inside it."""
        self.cfg, self.layout, self.actor, self.sampler = cfg, layout, actor, sampler
        self.resident = resident
        self.kl_ctl, self.clip_ctl = kl_ctl, clip_ctl
        self.save_dir = Path(cfg.checkpoint.save_dir).resolve() if cfg.checkpoint.save_dir else None
        self.reference_source: dict[str, str] | None = None
        plan: tuple[str | None, str | None] = (None, None)
        if layout.rank == 0:
            try:
                plan = self._plan()
            except OSError as e:  # e.g. an unwritable save_dir: every rank raises, none waits
                plan = (f"checkpoint.save_dir: {e}", None)
        error, resume = _broadcast(plan)
        if error:
            raise ConfigError(error)
        # Which run wrote a step folder: one that appears under save_dir while this run is going was
        # written by another run (where the run lock cannot work, e.g. some network filesystems).
        self.run_id: str = _broadcast(uuid.uuid4().hex[:12])
        self._present = {p.name for p in step_dirs.complete_steps(self.save_dir)} if self.save_dir else set()
        self.resume_from = Path(resume) if resume else None
        self.state: dict[str, Any] = {}
        if self.resume_from is not None:
            if cfg.checkpoint.verify:  # every file, run state and RNG included, before any is read
                verify_collective(self.resume_from, SKIP_HINT)
            self.state = _read_run_state(self.resume_from)

    def _plan(self) -> tuple[str | None, str | None]:
        """(error, folder to resume from), decided on rank 0 and shared."""
        if self.save_dir is not None:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            if stale := step_dirs.clean_stale(self.save_dir):
                say(f"removed {len(stale)} unfinished save(s) from {self.save_dir}: {', '.join(sorted(stale))}")
        try:
            found = find_resume(self.cfg)
        except ConfigError as e:
            return str(e), None
        existing = step_dirs.newest_complete(self.save_dir) if self.save_dir else None
        if found is None:
            if existing is not None:  # resume=never over a run's checkpoints
                return (
                    f"checkpoint.resume=never but checkpoint.save_dir={self.save_dir} already holds "
                    f"{existing.name}; a step folder is never overwritten: use another save_dir or resume=auto"
                ), None
            if self.cfg.checkpoint.resume == "auto" and self.save_dir is not None:
                say(f"resume=auto: no complete checkpoint under {self.save_dir}, starting fresh")
            return None, None
        found = found.resolve()
        latest = step_dirs.read_latest(self.save_dir) if self.save_dir is not None else None
        if found.parent == self.save_dir and (latest is None or latest.resolve() != found):
            step_dirs.publish_latest(self.save_dir, found)  # killed after the rename, before `latest`
        say(f"resuming from {found}")
        return None, str(found)

    @property
    def resuming(self) -> bool:
        return self.resume_from is not None

    # ---- the Reference -----------------------------------------------------------------------

    def reference(self, arch, *, warm_start: bool):
        """The frozen Reference: the actor as it starts (fresh run) or the recorded source (resume).

        `warm_start`: the actor's initial weights were handed in from memory (no path records them).
        Fresh run: call before the actor's first update.
        """
        from agpo_megatron.train.policy import Reference

        if self.resuming:
            source = self.state.get("reference")
            if not source:
                raise ConfigError(
                    f"checkpoint.resume: {self.resume_from} records no Reference source (the run "
                    "started without a KL term); it cannot resume with one"
                )
            self.reference_source = source
            say(f"Reference rebuilt from its recorded source: {source['kind']} {source['path']}")
            return Reference(arch, _config_for_source(self.cfg, source), self.layout)
        self.reference_source = self._initial_source(warm_start)
        return Reference(arch, self.cfg, self.layout, source=self.actor.model)

    def _initial_source(self, warm_start: bool) -> dict[str, str]:
        m = self.cfg.model
        if not warm_start and m.init_from == "hf":
            return {"kind": "hf", "path": str(Path(m.hf_path).resolve())}
        if not warm_start and m.init_from == "megatron":
            return {"kind": "megatron", "path": str(Path(self.cfg.checkpoint.load_dir).resolve())}
        if self.save_dir is None:  # nothing will be resumed
            return {"kind": "memory", "path": ""}
        return {"kind": "megatron", "path": str(self._save_initial_weights())}

    def _save_initial_weights(self) -> Path:
        from agpo_megatron.checkpoint.train_state import save_checkpoint

        final = self.save_dir / step_dirs.INITIAL
        tmp = self.save_dir / _broadcast(step_dirs.tmp_name(final.name))
        save_checkpoint(tmp, self.actor.chunks, step=0, hf_dir=self.cfg.model.hf_path)
        if self.layout.rank == 0:
            (tmp / step_dirs.COMPLETE_MARKER).write_text(json.dumps({"format": FORMAT, "initial_weights": True}) + "\n")
            step_dirs.fsync_tree(tmp)
            step_dirs.replace_folder(tmp, final)
            say(f"saved the initial weights (the Reference's source) to {final}")
        dist.barrier()
        return final

    # ---- resume ------------------------------------------------------------------------------

    def resume(self) -> tuple[int, float, tuple[float, float]]:
        """Restore actor, optimizer, scheduler, sampler, controllers and RNG; returns the first step to
        run and this step's kl_coef and eps (the controllers' starting values on a fresh start)."""
        if not self.resuming:
            return 1, self.kl_ctl.beta, self.clip_ctl.eps
        from agpo_megatron.checkpoint.train_state import load_checkpoint

        st, path = self.state, self.resume_from
        override, note = check_compatible(st, self.cfg, self.layout, path)
        if note:
            say(note)
        if override:  # Megatron's scheduler refuses another horizon unless told to take the new one
            self.actor.scheduler.override_opt_param_scheduler = True
        # Verified in __init__ (with checkpoint.verify); `check_sizes` still names a truncated file.
        load_checkpoint(path, self.actor.chunks, self.actor.optimizer, self.actor.scheduler, verify=False)
        try:
            self.sampler.load_state_dict(st["sampler"])
        except ValueError as e:  # what the saved config did not pin down, e.g. the file's contents changed
            raise ConfigError(
                f"checkpoint.resume: {path}: the saved data position does not fit this run's data ({e}); "
                f"resume with the saved data, or start fresh (checkpoint.resume=never, a new checkpoint.save_dir)"
            ) from None
        for name, ctl in (("kl_ctl", self.kl_ctl), ("clip_ctl", self.clip_ctl)):
            if ctl.stateful and not st.get(name):  # a fixed controller saves {} (older runs: None)
                raise ConfigError(f"checkpoint.resume: {path} has no adaptive {name} state (the run did not use it)")
            if not ctl.stateful and st.get(name):
                raise ConfigError(f"checkpoint.resume: {path} was saved by an adaptive {name}; this run's is fixed")
            ctl.load_state_dict(st.get(name))
        if st["layout"]["world_size"] == self.layout.world_size:
            set_rng_state(torch.load(rng_file(path, self.layout.rank), weights_only=True))
        else:
            say(
                f"saved at world size {st['layout']['world_size']}, resuming at {self.layout.world_size}: "
                "RNG states start fresh"
            )
        if self.layout.rank == 0:
            _trim_metrics(Path(self.cfg.logging.out_dir) / "metrics.jsonl", st["step"])
        return st["step"] + 1, float(st["kl_coef"]), (float(st["eps"][0]), float(st["eps"][1]))

    # ---- save --------------------------------------------------------------------------------

    def maybe_save(self, step: int, kl_coef: float, eps: tuple[float, float], *, force: bool = False) -> Path | None:
        """Save step `step` if it is a save step (or `force`, on preemption) and save_dir is set.

        Returns the step folder holding this step, or None when nothing is saved.
        """
        if self.save_dir is None or (self.cfg.checkpoint.due(step, self.cfg.steps) is None and not force):
            return None
        from agpo_megatron.checkpoint.train_state import save_checkpoint

        final = self.save_dir / step_dirs.step_name(step)
        name, error = None, None
        if self.layout.rank == 0:
            if final.exists() and final.name not in self._present:
                error = self._foreign(final)
            elif final.exists():
                say(f"{final} already exists and is never written into again: not saving step {step}")
            else:
                name = step_dirs.tmp_name(final.name)
                # Empty: Megatron warns "Overwriting old incomplete / corrupted checkpoint" into a non-empty one.
                (self.save_dir / name).mkdir(parents=True)
        name, error = _broadcast((name, error))
        if error:
            raise CheckpointError(error)
        if name is None:
            return final
        tmp = self.save_dir / name
        with self.resident():
            save_checkpoint(
                tmp,
                self.actor.chunks,
                self.actor.optimizer,
                self.actor.scheduler,
                step=step,
                extra_state={"sampler": self.sampler.state_dict(), "kl_coef": kl_coef, "eps": list(eps)},
                hf_dir=self.cfg.model.hf_path,
            )
        own_rng = rng_file(tmp, self.layout.rank)
        own_rng.parent.mkdir(exist_ok=True)  # every rank: whoever comes first creates it
        torch.save(rng_state(), own_rng)
        step_dirs.fsync_file(own_rng)
        step_dirs.kill_point("shards", step, self.layout.rank)
        dist.barrier()
        if self.layout.rank == 0:
            state = self._run_state(step, kl_coef, eps)
            (tmp / step_dirs.COMPLETE_MARKER).write_text(json.dumps(state, indent=1, default=str) + "\n")
            # The sidecar covers every file: RNG states and the run state too (verified on resume).
            rng = sorted(f"{RNG_DIR}/{f.name}" for f in (tmp / RNG_DIR).iterdir())
            add_checksums(tmp, [*rng, step_dirs.COMPLETE_MARKER])
            step_dirs.fsync_tree(tmp)
            try:
                step_dirs.commit(tmp, step, self.cfg.checkpoint.keep_last)
                self._present.add(final.name)
            except FileExistsError:  # another run committed this step meanwhile
                error = self._foreign(final)
                step_dirs.remove_tree(tmp)
        error = _broadcast(error)  # every rank raises alike; none waits in a barrier for rank 0
        if error:
            raise CheckpointError(error)
        return final

    def _foreign(self, folder: Path) -> str:
        """One line for a step folder another run wrote into this run's save_dir."""
        other = "?"
        with contextlib.suppress(OSError, ValueError, AttributeError):
            other = json.loads((folder / step_dirs.COMPLETE_MARKER).read_text()).get("run_id", "?")
        return (
            f"{folder} was written by another run (run id {other}; this run is {self.run_id}) while this run "
            f"was going: two runs share checkpoint.save_dir={self.save_dir}. Stop one; give each run its own "
            f"save_dir and logging.out_dir"
        )

    def _run_state(self, step: int, kl_coef: float, eps: tuple[float, float]) -> dict[str, Any]:
        lay = self.layout
        return {
            "format": FORMAT,
            "run_id": self.run_id,
            "step": step,
            "sampler": self.sampler.state_dict(),
            "kl_coef": kl_coef,
            "eps": list(eps),
            "kl_ctl": self.kl_ctl.state_dict(),
            "clip_ctl": self.clip_ctl.state_dict(),
            "reference": self.reference_source,
            "layout": {
                "world_size": lay.world_size,
                "tp": lay.tp,
                "pp": lay.pp,
                "dp": lay.dp,
                "ep": lay.ep,
                "etp": lay.etp,
            },
            "config": redact(to_dict(self.cfg)),  # no token from the environment lands in a checkpoint
        }


def _config_for_source(cfg: TrainConfig, source: dict[str, str]) -> TrainConfig:
    """`cfg` with the model's initial weights taken from `source` (how `policy._build` reads them)."""
    if source["kind"] == "hf":
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from="hf", hf_path=source["path"]))
    if source["kind"] == "megatron":
        return dataclasses.replace(
            cfg,
            model=dataclasses.replace(cfg.model, init_from="megatron"),
            checkpoint=dataclasses.replace(cfg.checkpoint, load_dir=source["path"]),
        )
    raise ConfigError(f"checkpoint.resume: the Reference's source {source} cannot be rebuilt")


def _trim_metrics(path: Path, step: int) -> None:
    """Drop rows after `step` (logged by the interrupted run after its last checkpoint): the
    resumed run logs those steps again."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [ln for ln in lines if _row_step(ln) <= step]
    if len(keep) != len(lines):
        step_dirs.write_atomic(path, "".join(keep))


def _row_step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:  # a row cut short by the kill
        return float("inf")
