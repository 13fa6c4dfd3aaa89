"""Everything the loop needs that is set up once: the world, the model shape, tokenizer, data, the
rollout engine and evaluation. Order matters: the config is validated against the
world size first, then Megatron's groups exist before vLLM joins the same world. The engine is
handed out asleep (see train/colocate.py for who wakes it, and when).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.distributed as dist

from agpo_megatron.config.schema import TrainConfig
from agpo_megatron.data.datasets import Example, load_examples, report_drops
from agpo_megatron.evals.evaluate import Analyze, EvalMode, evaluate_modes
from agpo_megatron.models.hf_config import ModelArch, load_tokenizer, read_arch
from agpo_megatron.plan.preflight import check_paths
from agpo_megatron.rollout.base import RolloutEngine, SamplingConfig, model_stop_token_ids
from agpo_megatron.rollout.remote import RemoteRollout
from agpo_megatron.runtime.parallel import Layout, init_distributed, init_model_parallel
from agpo_megatron.runtime.placement import Placement


@dataclasses.dataclass
class Session:
    cfg: TrainConfig
    arch: ModelArch
    layout: Layout
    tokenizer: Any
    pad_id: int
    train_examples: list[Example]
    eval_examples: list[Example]
    rollout: RolloutEngine
    stop_token_ids: tuple[int, ...] = ()
    """Every token that ends a response (the tokenizer's EOS and all generation_config eos ids)."""
    eval_modes: tuple[EvalMode, ...] = ()
    """How `evaluate` samples the held-out set; empty: once, as `rollout.eval_temperature/eval_n` say
    (the demo sets greedy and sampled)."""
    analyze: Analyze | None = None
    """The task's per-response measures (e.g. the steps task's reasoning and waste tokens): logged per
    step as `task/<name>` (mean over the step's responses) and in every evaluation."""

    @classmethod
    def create(cls, cfg: TrainConfig, placement: Placement | None = None) -> Session:
        """The session of a colocated run, or of a disaggregated run's trainer ranks (`placement`, from
        `runtime.placement.split_world`: the engine is then the rollout ranks', reached over the link)."""
        from agpo_megatron.rollout.vllm_engine import VLLMEngine

        check_paths(cfg)  # missing files / unwritable dirs: one line now, not an error after start-up
        init_distributed(timeout_s=cfg.parallel.timeout_s)
        cfg.check_world(placement.world_size if placement else dist.get_world_size())  # before any model or engine
        cfg.check_machine()
        arch = read_arch(cfg.model.hf_path)
        layout = init_model_parallel(
            cfg.parallel.tp,
            cfg.parallel.pp,
            cfg.parallel.seed,
            timeout_s=cfg.parallel.timeout_s,
            ep=cfg.parallel.ep,
            etp=cfg.parallel.etp,
        )
        tokenizer = load_tokenizer(cfg.model.hf_path)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        train, stats = load_examples(cfg.data.train, tokenizer)
        report = [report_drops(stats, "data.train", cfg.data.train, cfg.data.max_drop_frac)]
        evals = []
        if cfg.data.eval is not None:
            evals, stats = load_examples(cfg.data.eval, tokenizer)
            report.append(report_drops(stats, "data.eval", cfg.data.eval, cfg.data.max_drop_frac))
        if dist.get_rank() == 0:
            print("\n".join(report), flush=True)
        engine: RolloutEngine
        if placement is not None:
            engine = RemoteRollout(placement.link, step_timeout_s=cfg.parallel.step_timeout_s)
        else:
            engine = VLLMEngine.from_config(
                cfg.rollout, cfg.model, seed=cfg.parallel.seed, return_routed_experts=cfg.algo.routing_replay == "r3"
            )
            # Asleep from the start: the actor (and reference) are built in the memory vLLM frees;
            # the trainer wakes it and syncs the actor's weights before the first generate.
            engine.sleep()
        stop_ids = model_stop_token_ids(cfg.model.hf_path, tokenizer.eos_token_id)
        return cls(cfg, arch, layout, tokenizer, pad_id, train, evals, engine, stop_ids)

    def for_run(self, cfg: TrainConfig) -> Session:
        """This session (same world, model, data and engine) for another run's config, e.g. the demo's
        GRPO baseline and AGPO runs. Only what the session did not build from may differ."""
        for field in ("model", "parallel", "rollout", "data"):
            if getattr(cfg, field) != getattr(self.cfg, field):
                raise ValueError(f"Session.for_run: `{field}` differs from the session's; build a new Session")
        return dataclasses.replace(self, cfg=cfg)

    def train_sampling(self, step: int) -> SamplingConfig:
        r = self.cfg.rollout
        return SamplingConfig(
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            max_new_tokens=r.max_new_tokens,
            seed=self.cfg.parallel.seed * 100_003 + step,
            logprobs=r.logprob_mode == "rollout" or self.cfg.algo.loss.rollout_correction != "none",
            stop_token_ids=self.stop_token_ids,
        )

    def evaluate(self, step: int) -> dict[str, Any]:
        r = self.cfg.rollout
        sampling = SamplingConfig(
            temperature=r.eval_temperature,
            top_p=1.0,
            top_k=-1,
            max_new_tokens=r.max_new_tokens,
            seed=self.cfg.parallel.seed,
            logprobs=False,
            stop_token_ids=self.stop_token_ids,
        )
        return evaluate_modes(
            self.rollout,
            self.eval_examples,
            self.eval_modes or (EvalMode("", r.eval_temperature, r.eval_n),),
            sampling,
            timeout_s=self.cfg.data.reward_timeout_s,
            budget_s=self.cfg.data.reward_step_budget_s,
            analyze=self.analyze,
        )

    def task_metrics(self, completions: list[Any], correct: list[bool] | None = None) -> dict[str, float]:
        """Means of `analyze` over one step's responses (empty without a task analyzer).

        With `correct` (one verdict per completion) and a task that measures steps and waste, also
        the accuracy of three kinds of response: with steps and waste (`acc_steps_waste`), with steps
        and no waste (`acc_steps_no_waste`), without steps (`acc_no_steps`); a kind absent from the
        step is left out. Whether waste changes correctness while sampling is then measured, not assumed.
        """
        if self.analyze is None or not completions:
            return {}
        per = [self.analyze(c.text, len(c.token_ids)) for c in completions]
        out = {k: sum(m[k] for m in per) / len(per) for k in per[0]}
        if correct is not None and {"waste_tokens", "steps_present"} <= set(per[0]):
            kinds: dict[str, list[bool]] = {"acc_steps_waste": [], "acc_steps_no_waste": [], "acc_no_steps": []}
            for m, ok in zip(per, correct, strict=True):
                kind = (
                    "acc_no_steps"
                    if not m["steps_present"]
                    else "acc_steps_waste"
                    if m["waste_tokens"]
                    else "acc_steps_no_waste"
                )
                kinds[kind].append(ok)
            out |= {k: sum(v) / len(v) for k, v in kinds.items() if v}
            # How often responses carry waste, with and without steps: waste that goes with skipping
            # the steps costs accuracy through that choice, even when a forced cell shows none.
            for steps, key in ((1.0, "waste_frac_with_steps"), (0.0, "waste_frac_without_steps")):
                had = [m["waste_tokens"] > 0 for m in per if m["steps_present"] == steps]
                if had:
                    out[key] = sum(had) / len(had)
        return out
