"""``python -m workers.calibrate``: fit the step-latency model to a running engine and write it to a file.

    python -m workers.calibrate --out results/calibration/tiny-cpu.json            # vLLM, tiny model
    python -m workers.calibrate --engine tables --model llama3-8b --gpu a100 --out llama3-8b-a100.json
    python -m workers.calibrate --engine log --from-log run/w0.steps run/w1.steps --out served.json

``--engine vllm`` runs the worker's vLLM engine in this process through a grid of batch compositions
(:mod:`workers.engines.vllm_calibrate`), fits :class:`~dynaserve.costmodel.StepLatencyModel` on relative error
and reports its error on held-out steps. ``--engine tables`` writes the cost-table model of a preset (nothing
is measured), so a simulated-engine cluster can be given a file like any other. ``--engine log`` fits the
steps that serving workers recorded (``--step-log``, e.g. ``scripts/cluster.py --step-log-dir DIR``): the
model of the engine under its real traffic, with what shares its cores. Load the file with
``--step-model FILE`` on the worker and the broker, or ``ClusterConfig.step_model``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Sequence

from tqdm import tqdm

from dynaserve.calibration import StepModelFile, fit_with_holdout, read_step_log
from dynaserve.env import apply_loopback_kv_env
from workers.engines.vllm_config import VllmEngineConfig


def cpu_name() -> str:
    """A short description of this machine's CPU (model name and usable cores)."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {len(os.sched_getaffinity(0))} cores, {name}"


def calibrate_vllm(ns: argparse.Namespace) -> StepModelFile:
    from workers.engines.vllm_calibrate import grid, measure

    device = cpu_name()  # the process's cores (the engine binds only its own thread)
    cfg = VllmEngineConfig(model=ns.model, max_model_len=ns.max_model_len, side_channel_port=ns.side_channel_port,
                           cpu_bind=ns.cpu_bind, max_num_batched_tokens=ns.max_num_batched_tokens)
    bar = tqdm(total=ns.repeats * len(grid(cfg.max_model_len, ns.quick)), desc="calibrate", unit="batch",
               file=sys.stderr)

    def progress(n: int, name: str) -> None:
        bar.set_postfix_str(f"{n} steps, {name}")
        bar.update(1)

    samples, facts = measure(cfg, ns.repeats, ns.quick, progress)
    bar.close()
    if ns.samples_out:
        with open(ns.samples_out, "w") as fh:
            fh.write("prefill_tokens,decode_seqs,decode_ctx_tokens,prefill_attn,ms\n")
            fh.writelines(f"{p},{n},{c},{a:.1f},{ms:.4f}\n" for p, n, c, a, ms in samples)
    model, err = fit_with_holdout(samples, ns.holdout, ns.seed)
    bind = f", bound to cores {cfg.cpu_bind}" if cfg.cpu_bind else ""
    return StepModelFile(
        model=model, kv_bytes_per_token=int(facts["kv_bytes_per_token"]), model_name=str(facts["model"]),
        device=device + bind if cfg.device == "cpu" else cfg.device, engine="vllm", samples=len(samples),
        fit_error=err, note=f"dtype {cfg.dtype}, max_num_batched_tokens {cfg.max_num_batched_tokens}, "
                            f"repeats {ns.repeats}, holdout {ns.holdout}",
    )


def from_logs(ns: argparse.Namespace) -> StepModelFile:
    from dynaserve.costmodel import preset_step_model

    if not ns.from_log:
        raise ValueError("--engine log needs --from-log FILE [FILE ...]")
    samples = [s for path in ns.from_log for _, s in read_step_log(path)]
    model, err = fit_with_holdout(samples, ns.holdout, ns.seed)
    _, kv_bytes = preset_step_model(ns.model, ns.gpu, ns.tp)
    return StepModelFile(model=model, kv_bytes_per_token=kv_bytes, model_name=os.path.basename(os.path.normpath(ns.model)),
                         device=cpu_name(), engine="log", samples=len(samples), fit_error=err,
                         note=f"fitted to the step logs {', '.join(ns.from_log)}; holdout {ns.holdout}")


def from_tables(ns: argparse.Namespace) -> StepModelFile:
    from dynaserve.costmodel import preset_step_model

    model, kv_bytes = preset_step_model(ns.model, ns.gpu, ns.tp)
    return StepModelFile(model=model, kv_bytes_per_token=kv_bytes, model_name=ns.model, device=f"{ns.tp}x {ns.gpu}",
                         engine="tables", note="cost tables (dynaserve.costtables), not measured")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dynaserve-calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=("vllm", "tables", "log"), default="vllm",
                   help="vllm: measure the vLLM engine; tables: write a preset's cost-table model; log: fit the "
                        "step logs of serving workers (--from-log) (default vllm)")
    p.add_argument("--from-log", nargs="*", default=[], help="log: worker step logs (--step-log) to fit")
    p.add_argument("--model", default=VllmEngineConfig.model,
                   help="vllm: HF model directory; tables and log: preset or HF directory, for the KV bytes per token "
                        "(default the tiny model)")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--repeats", type=int, default=2, help="vllm: passes over the composition grid (default 2)")
    p.add_argument("--holdout", type=float, default=0.25, help="share of steps held out to measure the error")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    p.add_argument("--samples-out", default="", help="vllm: also write the measured steps to this CSV")
    p.add_argument("--quick", action="store_true", help="vllm: a handful of compositions (smoke test)")
    p.add_argument("--max-model-len", type=int, default=VllmEngineConfig.max_model_len, help="vllm: context length")
    p.add_argument("--max-num-batched-tokens", type=int, default=VllmEngineConfig.max_num_batched_tokens,
                   help="vllm: tokens per step at most (the worker's value)")
    p.add_argument("--cpu-bind", default="0",
                   help="vllm on CPU: cores the engine computes on; a local cluster binds worker i to core i "
                        "(default 0; empty = no binding)")
    p.add_argument("--side-channel-port", type=int, default=5690,
                   help="vllm: NIXL handshake port of the probe engine (distinct from running workers)")
    p.add_argument("--gpu", default="a100", help="tables: GPU of the cost tables")
    p.add_argument("--tp", type=int, default=1, help="tables: tensor-parallel degree")
    ns = p.parse_args(argv)
    if ns.repeats < 1:
        p.error("--repeats must be >= 1")
    apply_loopback_kv_env()
    try:
        out = {"vllm": calibrate_vllm, "tables": from_tables, "log": from_logs}[ns.engine](ns)
    except ValueError as exc:
        p.error(str(exc))
    out.save(ns.out)
    m, e = out.model, out.fit_error
    print(f"{out.model_name} on {out.device}: a={m.a:.4g} b={m.b:.4g} c={m.c:.4g} d={m.d:.4g} e={m.e:.4g} ms; "
          f"kv {out.kv_bytes_per_token} B/token; {out.samples} steps", file=sys.stderr)
    if e.holdout:
        print(f"held-out relative error over {e.holdout} steps: median {e.median:.1%}, P90 {e.p90:.1%}",
              file=sys.stderr)
    print(f"wrote {ns.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
