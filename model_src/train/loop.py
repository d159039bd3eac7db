"""The resumable training loop shared by every phase.

A phase directory holds::

    log.jsonl        one JSON line per logged step (means since the previous line)
    loss.png         the loss curve (matplotlib, Agg)
    resume/          state.safetensors (modules), optimizer.safetensors (AdamW moments),
                     progress.json (step, config); written every `ckpt_every` steps
    phase.json       written when the phase finished: final metrics and wall time

No pickle anywhere: tensors go to safetensors, everything else to JSON. A run resumed from
step s replays exactly the batches and updates of an uninterrupted run (batches are a function of
(seed, phase, step); CPU kernels are deterministic for a fixed thread count).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from maven_edge.core.errors import TrainingError
from maven_edge.model_src.train.recipe import PhaseConfig

StepFn = Callable[[int], dict[str, float]]


@dataclass
class Phase:
    name: str
    config: PhaseConfig
    modules: dict[str, nn.Module]  # whose state a resume checkpoint holds
    params: list[tuple[str, nn.Parameter]]  # trainable parameters, named "module.param"
    step_fn: StepFn  # forward + backward for one step (grads accumulate); returns metrics with "loss"
    after_step: Callable[[int], dict[str, float]] | None = None  # e.g. dead-code restarts
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # extra state saved for resume
    finish: Callable[[], dict[str, Any]] | None = None  # final metrics for phase.json
    seed: int | None = None  # the phase's seed (run --seed + seed_offset): recorded, and checked on resume


def same_config(saved: dict | None, cfg: PhaseConfig) -> bool:
    """Whether a phase config saved in a run directory is `cfg`. Fields the saved one lacks (knobs
    added to PhaseConfig after it was written) count as their defaults, so older runs still resume."""
    if not isinstance(saved, dict):
        return False
    defaults = {f.name: f.default for f in fields(PhaseConfig) if f.default is not MISSING}
    filled = json.loads(json.dumps({**defaults, **saved}))
    return filled == json.loads(json.dumps(asdict(cfg)))


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file, so a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_resume(phase: Phase, opt: torch.optim.Optimizer, step: int, directory: Path) -> None:
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {}
    for mname, module in phase.modules.items():
        for k, v in module.state_dict().items():
            state[f"{mname}.{k}"] = v.detach().contiguous().clone()
    for k, v in phase.buffers.items():
        state[f"buffer.{k}"] = v.detach().contiguous().clone()
    save_file(state, str(tmp / "state.safetensors"))
    opt_state = {}
    for name, p in phase.params:
        st = opt.state.get(p, {})
        for key in ("step", "exp_avg", "exp_avg_sq"):
            if key in st:
                t = st[key] if torch.is_tensor(st[key]) else torch.tensor(float(st[key]))
                opt_state[f"{name}::{key}"] = t.detach().contiguous().clone()
    save_file(opt_state, str(tmp / "optimizer.safetensors"))
    _atomic_json(tmp / "progress.json",
                 {"phase": phase.name, "step": step, "config": asdict(phase.config), "seed": phase.seed})
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def check_seed(saved: dict[str, Any], seed: int | None, where: Path) -> None:
    """A TrainingError when a phase saved in `where` was trained with another seed than `seed` (the
    phase's: the run's --seed plus its seed_offset). Older files without a seed, or no seed given,
    pass: batches are a pure function of (seed, phase, step), so a resume with another seed would
    silently mix two sample streams in one phase."""
    if seed is None or saved.get("seed") is None or int(saved["seed"]) == seed:
        return
    raise TrainingError(
        f"{where} was trained with phase seed {saved['seed']}, this run asks for {seed}; resume with the "
        "--seed it was started with, or start a new --out"
    )


def load_resume(phase: Phase, opt: torch.optim.Optimizer, directory: Path) -> int:
    """Restore modules, buffers and optimizer; return the next step to run."""
    try:
        progress = json.loads((directory / "progress.json").read_text())
        state = load_file(str(directory / "state.safetensors"))
        opt_state = load_file(str(directory / "optimizer.safetensors"))
    except (OSError, ValueError, SafetensorError) as exc:
        raise TrainingError(f"cannot resume from {directory}: {exc}; delete it to start the phase again") from exc
    if not same_config(progress.get("config"), phase.config):
        raise TrainingError(
            f"{directory} was written with a different {phase.name} config; resume with the same "
            "--steps-scale/--preset, or delete the directory to start again"
        )
    check_seed(progress, phase.seed, directory)
    for mname, module in phase.modules.items():
        prefix = mname + "."
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(sub, strict=True)
    for k, v in phase.buffers.items():
        v.copy_(state[f"buffer.{k}"])
    for name, p in phase.params:
        if f"{name}::step" in opt_state:
            opt.state[p] = {key: opt_state[f"{name}::{key}"].clone() for key in ("step", "exp_avg", "exp_avg_sq")}
    return int(progress["step"])


def plot_losses(records: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        phases.setdefault(r.get("phase", title), []).append(r)
    fig, axes = plt.subplots(1, len(phases), figsize=(4.2 * max(1, len(phases)), 3.2), squeeze=False)
    for ax, (name, recs) in zip(axes[0], phases.items(), strict=True):
        steps = [r["step"] for r in recs]
        ax.plot(steps, [r["loss"] for r in recs], label="loss")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_phase(phase: Phase, directory: Path, resume: bool, quiet: bool = False) -> dict[str, Any]:
    """Train one phase (or skip it when `phase.json` says it finished); return its summary. The phase's
    seed (`Phase.seed`, recorded in phase.json and the resume state) is checked on resume."""
    cfg = phase.config
    directory.mkdir(parents=True, exist_ok=True)
    done = directory / "phase.json"
    if done.is_file():
        summary = json.loads(done.read_text())
        if same_config(summary.get("config"), cfg) and resume:
            check_seed(summary, phase.seed, directory)
            _load_final(phase, directory)
            return summary
    resume_dir = directory / "resume"
    log_path = directory / "log.jsonl"
    params = [p for _, p in phase.params]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    start = 0
    if resume and (resume_dir / "progress.json").is_file():
        start = load_resume(phase, opt, resume_dir)
        records = [r for r in read_jsonl(log_path) if r["step"] < start]
    else:
        shutil.rmtree(resume_dir, ignore_errors=True)
        records = []
    log_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    t0 = time.time()
    elapsed_before = records[-1]["time_s"] if records else 0.0
    acc: dict[str, list[float]] = {}
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"train {phase.name}",
               mininterval=3.0, disable=quiet, dynamic_ncols=True)
    for step in bar:
        lr = cfg.lr_at(step)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        metrics = phase.step_fn(step)
        loss = metrics["loss"]
        if loss != loss:  # NaN
            raise TrainingError(f"{phase.name}: loss became NaN at step {step}; lower the learning rate")
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if phase.after_step is not None:
            metrics.update(phase.after_step(step))
        for k, v in metrics.items():
            acc.setdefault(k, []).append(float(v))
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        last = step == cfg.steps - 1
        if (step + 1) % cfg.log_every == 0 or last:
            rec = {"phase": phase.name, "step": step, "lr": lr}
            rec.update({k: sum(v) / len(v) for k, v in acc.items()})
            rec["time_s"] = round(elapsed_before + time.time() - t0, 2)
            records.append(rec)
            with log_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            acc = {}
        if (step + 1) % cfg.ckpt_every == 0 and not last:
            save_resume(phase, opt, step + 1, resume_dir)
    bar.close()
    summary: dict[str, Any] = {
        "phase": phase.name,
        "config": asdict(cfg),
        "steps": cfg.steps,
        "final_loss": records[-1]["loss"] if records else None,
        "wall_time_s": round(elapsed_before + time.time() - t0, 1),
        "seed": phase.seed,
    }
    if phase.finish is not None:
        summary.update(phase.finish())
    save_resume(phase, opt, cfg.steps, resume_dir)  # final state: later phases can reload it
    plot_losses(records, directory / "loss.png", phase.name)
    _atomic_json(done, summary)
    return summary


def _load_final(phase: Phase, directory: Path) -> None:
    """A finished phase being skipped: restore the modules it trained from its final state."""
    state_path = directory / "resume" / "state.safetensors"
    if not state_path.is_file():
        raise TrainingError(f"{directory} says it finished but has no resume/state.safetensors; delete it")
    state = load_file(str(state_path))
    for mname, module in phase.modules.items():
        prefix = mname + "."
        module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    for k, v in phase.buffers.items():
        v.copy_(state[f"buffer.{k}"])
