"""Measure vLLM engine steps of known batch composition (for ``python -m workers.calibrate``).

The engine is the worker's own :class:`~workers.engines.vllm_engine.VllmEngine` (same EngineArgs, scheduler
subclass and KV connector), driven step by step in this process. A local scheduler with a fixed prefill
token budget makes vLLM's scheduler cut prompts into chunks of exactly that size; what each step really
carried is read back from the scheduler's ``last_step`` summary, so every sample's features are the ones
the worker would see. The grid:

- prefill: one long prompt cut into chunks of 32..1024 tokens (so chunks run at growing context offsets);
- decode: 1..64 sequences at 32..1500 tokens of context (their own prefill steps are samples too);
- mixed: 4..48 running decodes next to a prompt prefilled in 64..512-token chunks.

Only workers/engines/vllm* imports vllm.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from dynaserve.calibration import Sample
from dynaserve.costmodel import StepLatencyModel
from workers.engines.vllm_config import VllmEngineConfig
from workers.local_scheduler import LocalScheduler, LocalSchedulerConfig


class FixedBudget(LocalScheduler):
    """A local scheduler whose prefill budget is set from outside (``budget``) rather than by the SLO."""

    budget: int = 2048

    def token_budget(self, decode_seqs: int, decode_ctx_tokens: int, first_prefill_ctx: int = 0) -> int:
        return self.budget


@dataclass(frozen=True)
class Scenario:
    """One group of steps: ``decodes`` sequences of ``decode_ctx`` prompt tokens brought to decoding,
    then (optionally) one prompt of ``prefill_len`` tokens prefilled in chunks of ``chunk`` next to them."""

    name: str
    decodes: int = 0
    decode_ctx: int = 0
    decode_steps: int = 0  # decode-only steps after the decodes' prefill (when there is no prompt)
    prefill_len: int = 0
    chunk: int = 0


def grid(max_model_len: int, quick: bool = False) -> list[Scenario]:
    """The batch compositions to measure (``quick``: a handful, for tests)."""
    top = max_model_len - 64
    if quick:
        return [Scenario("prefill", prefill_len=min(512, top), chunk=128),
                Scenario("decode", decodes=4, decode_ctx=64, decode_steps=6),
                Scenario("mixed", decodes=4, decode_ctx=64, prefill_len=min(256, top), chunk=64)]
    out = [Scenario(f"prefill c{c}", prefill_len=min(top, 8 * c), chunk=c) for c in (32, 64, 128, 256, 512, 1024)]
    out += [Scenario(f"decode n{n} ctx{x}", decodes=n, decode_ctx=min(x, top), decode_steps=12)
            for n in (1, 4, 16, 64) for x in (32, 512, 1500)]
    out += [Scenario(f"mixed n{n} ctx{x} c{c}", decodes=n, decode_ctx=min(x, top), prefill_len=min(top, 6 * c), chunk=c)
            for n in (4, 16, 48) for x in (128, 1024) for c in (64, 256, 512)]
    return out


class StepProbe:
    """The worker's vLLM engine, driven one measured step at a time."""

    def __init__(self, cfg: VllmEngineConfig) -> None:
        from workers.engines.vllm_engine import VllmEngine

        # the model is never consulted: FixedBudget overrides the only method vLLM's scheduler calls
        self.local = FixedBudget(StepLatencyModel(), LocalSchedulerConfig(max_batched_tokens=cfg.max_num_batched_tokens))
        self.engine = VllmEngine(cfg, self.local)
        self.llm = self.engine.llm
        self.sched = self.engine.sched
        self.info = self.engine.info
        self._n = 0
        self._live: list[str] = []

    def _add(self, prompt_len: int, max_tokens: int) -> None:
        from vllm import SamplingParams

        self._n += 1
        rid = f"cal{self._n}"
        ids = [(i * 31 + self._n * 7) % (self.info.vocab_size - 3) + 3 for i in range(prompt_len)]
        self.llm.add_request(rid, {"prompt_token_ids": ids},
                             SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0))
        self._live.append(rid)

    def _step(self) -> Sample | None:
        t0 = time.perf_counter()
        self.llm.step()
        ms = (time.perf_counter() - t0) * 1000.0
        plan = self.sched.last_step
        self.sched.last_step = None
        if plan is None or plan.empty:
            return None
        return (plan.prefill_tokens, len(plan.decodes), plan.decode_ctx_tokens, plan.prefill_attn, ms)

    def _decoding(self) -> int:
        return sum(1 for r in self.sched.running if r.num_computed_tokens >= r.num_prompt_tokens)

    def run(self, sc: Scenario) -> list[Sample]:
        """The samples of one scenario, measured on the engine thread (bound to the engine's cores, where the
        worker runs its steps); leaves the engine empty."""
        return self.engine.run_on_engine_thread(lambda: list(self._scenario(sc)))

    def _scenario(self, sc: Scenario) -> Iterator[Sample]:
        chunks = -(-sc.prefill_len // sc.chunk) if sc.prefill_len else 0
        if sc.decodes:
            budget = self.sched.scheduler_config.max_num_batched_tokens
            self.local.budget = budget
            prefill_steps = -(-sc.decodes * sc.decode_ctx // budget) + sc.decodes
            for _ in range(sc.decodes):
                # enough tokens that no sequence ends before the scenario does
                self._add(sc.decode_ctx, prefill_steps + sc.decode_steps + chunks + 4)
            for _ in range(prefill_steps):
                if self._decoding() >= sc.decodes:
                    break
                s = self._step()
                if s is not None:
                    yield s
            for _ in range(sc.decode_steps):
                s = self._step()
                if s is not None:
                    yield s
        if sc.prefill_len:
            self.local.budget = sc.chunk
            self._add(sc.prefill_len, 1)
            for _ in range(chunks):
                s = self._step()
                if s is not None:
                    yield s
        self.llm.abort_request(self._live)
        self._live = []
        while self.llm.has_unfinished_requests():
            self.llm.step()
        self.sched.last_step = None

    def close(self) -> None:
        self.engine.close()


def measure(cfg: VllmEngineConfig, repeats: int, quick: bool,
            progress: Callable[[int, str], None] | None = None) -> tuple[list[Sample], dict[str, int | str]]:
    """Run the grid ``repeats`` times; returns the samples and the engine's facts (model, KV bytes)."""
    probe = StepProbe(cfg)
    try:
        scenarios = grid(probe.info.max_model_len, quick)
        for _ in range(2):  # warm-up: the first steps of each shape pay for lazy start-up work
            probe.run(scenarios[0])
        samples: list[Sample] = []
        for _ in range(repeats):
            for sc in scenarios:
                samples += probe.run(sc)
                if progress is not None:
                    progress(len(samples), sc.name)
        facts: dict[str, int | str] = {"model": probe.info.model, "kv_bytes_per_token": probe.info.kv_bytes_per_token,
                                       "max_model_len": probe.info.max_model_len}
        return samples, facts
    finally:
        probe.close()
