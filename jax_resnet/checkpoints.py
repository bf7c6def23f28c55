"""Orbax checkpoints of a training run: the arrays (params, BatchNorm state,
optimizer state) and a JSON `meta` (epoch, step, seed, the run's config).

Saves are atomic: orbax writes each checkpoint into
`<step>.orbax-checkpoint-tmp-*` and renames it only once complete, so a kill
while saving leaves the previous checkpoint intact; leftovers are removed when
the next run opens the folder. Only the newest `max_to_keep` are kept.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

__all__ = [
    "manager",
    "save",
    "restore_meta",
    "restore_tree",
    "restore_newest_intact",
    "load",
    "finished_steps",
    "remove_unfinished",
]


def manager(directory: Path, max_to_keep: int) -> ocp.CheckpointManager:
    """A synchronous checkpoint manager over `directory` (created if missing).

    In a run of several processes every process calls it and every save and restore, as orbax
    requires: each writes the array shards its devices hold (replicated arrays: one copy), process
    0 (orbax's primary host) writes the metadata and renames the finished checkpoint, and orbax's
    barriers keep them in step. `directory` must then be one folder all processes see."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        cleanup_tmp_directories=True,  # leftovers of a save that was killed
        enable_async_checkpointing=False,
        multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=0),
    )
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save(mngr: ocp.CheckpointManager, step: int, tree: dict, meta: dict) -> None:
    """Write `tree` (a pytree of arrays) and `meta` (JSON) as checkpoint `step`."""
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))


def restore_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def restore_tree(mngr: ocp.CheckpointManager, step: int, target: dict) -> dict:
    """The checkpointed arrays, in `target`'s structure, dtypes and shardings."""
    return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state


def restore_newest_intact(mngr: ocp.CheckpointManager, target: dict, log=print) -> tuple[int, dict, dict] | None:
    """(step, tree, meta) of the newest checkpoint that reads back whole, or None when there is none.

    A checkpoint that fails to read (a truncated or garbage array file,
    missing metadata) is named in the log and moved aside to
    `<checkpoints>-damaged/<step>`, so that nothing is lost and the run can
    save that step again; the next older one is tried. With checkpoints
    present but none intact, raises ValueError listing what each one lacked.
    """
    damaged = []
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            meta = restore_meta(mngr, step)
            tree = restore_tree(mngr, step, target)
        except Exception as e:  # any failure to read it back makes the checkpoint unusable
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            damaged.append((step, reason))
            log(f"resume: checkpoint step {step} is damaged ({reason}); trying an older one")
            continue
        if damaged:
            if jax.process_index() == 0:  # one process moves them; the others wait until it has
                for bad, _ in damaged:
                    _set_aside(mngr, bad, log)
            multihost_utils.sync_global_devices("jax_resnet.checkpoints: damaged checkpoints set aside")
            mngr.reload()
        return step, tree, meta
    if damaged:
        listing = "; ".join(f"step {s}: {r}" for s, r in damaged)
        raise ValueError(
            f"resume: no intact checkpoint under {mngr.directory} ({listing}); "
            "start again with a new --out, or remove the damaged checkpoints"
        )
    return None


def _set_aside(mngr: ocp.CheckpointManager, step: int, log) -> None:
    directory = Path(mngr.directory)
    aside = directory.with_name(directory.name + "-damaged")
    aside.mkdir(exist_ok=True)
    shutil.move(str(directory / str(step)), str(aside / str(step)))
    log(f"resume: moved damaged checkpoint step {step} to {aside / str(step)}")


def load(out: str | os.PathLike, step: int | None = None) -> tuple[dict, dict]:
    """Read a run's checkpoint (default: the newest) without training.

    Returns:
      (tree, meta): tree has "params", "state" and "opt_state" (optax states
      as nested containers, since no target structure is given), every array
      on this process's first device whatever devices and processes saved it;
      meta has "epoch", "step", "seed" and "config".
    """
    directory = Path(out) / "checkpoints"
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager(directory.absolute(), options=options) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {directory}")
        with ocp.StandardCheckpointer() as reader:  # the saved shapes and dtypes, without the saved devices
            found = reader.metadata((directory / str(step) / "state").absolute())
        # Newer orbax (0.12.8 here) wraps the tree's metadata in a StepMetadata; 0.11.21 returns it bare.
        saved = getattr(found, "item_metadata", found)
        here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=here), saved)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        restored = mngr.restore(step, args=args)
    return restored.state, restored.meta


def finished_steps(directory: Path) -> list[int]:
    """The steps of the complete checkpoints under `directory` (orbax renames a save to its step when done)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def remove_unfinished(directory: Path) -> list[str]:
    """Remove what a save that failed part-way (a full disk) left under `directory`; returns the names removed.

    Orbax writes each save into `<step>.orbax-checkpoint-tmp-*`, renamed only when complete; the manager would
    clear such folders when it next opens the directory, but a failed run should not leave half a checkpoint
    (and the space it holds) behind until then.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    unfinished = sorted(p for p in directory.iterdir() if ".orbax-checkpoint-tmp" in p.name)
    for p in unfinished:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return [p.name for p in unfinished]
