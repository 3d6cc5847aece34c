"""Train one stage from a recipe.

    torchrun --nproc_per_node=N -m megatron_vlm.train --recipe recipes/tiny/stage1.yaml \\
        [train.steps=20 parallel.tp=2 ...]

Under Slurm, ``srun`` one task per GPU runs the same command without torchrun.

Continue a stage from its checkpoint alone (the recipe it was trained with is in the
checkpoint's ``description.json``)::

    torchrun --nproc_per_node=N -m megatron_vlm.train --checkpoint runs/tiny/stage1 [train.steps=40]

``--checkpoint`` is a checkpoint root (``checkpoint.dir``) or one ``step_*`` directory in it;
training resumes from the root's newest good checkpoint. Which recipe wins: ``--recipe``, when
given, replaces the saved one (its ``checkpoint.dir`` becomes the ``--checkpoint`` root);
``section.key=value`` overrides apply on top of either. Whatever the recipe, its model config
must equal the one saved in the checkpoint it resumes (else exit 2 naming the differing fields);
parallel layout, schedule, data and steps may change.
"""

import argparse
import sys

from megatron_vlm.known_warnings import ignore_known_noise

ignore_known_noise()  # before megatron-core is imported: it warns at import time

from megatron_vlm.training.recipe import RecipeError, load_recipe  # noqa: E402

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM / wall-time limit, checkpoint saved


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", help="stage recipe YAML (with --checkpoint: replaces the "
                                          "recipe saved in the checkpoint)")
    parser.add_argument("--checkpoint", help="resume from this checkpoint root or step directory "
                                             "with the recipe saved in it")
    parser.add_argument("--validate-only", action="store_true",
                        help="check the recipe (keys, types, paths) and exit")
    parser.add_argument("--world-size", type=int, default=None,
                        help="with --validate-only: check parallel and batch sizes for this many "
                             "ranks (default: the launcher's world size, else 1)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    if not (args.recipe or args.checkpoint):
        parser.error("give --recipe, --checkpoint, or both")
    from megatron_vlm.distributed import fail_job, read_launch_env

    launch = read_launch_env()
    try:
        code = _run(args)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - every error ends the job, reported once
        message, code = _describe(e, launch)
        if launch.world_size > 1:
            fail_job(message, code, launch)  # does not return: the other ranks stop too
        print(message, file=sys.stderr, flush=True)
        return code
    return code


def _describe(error: BaseException, launch) -> tuple[str, int]:
    """One message and exit code per kind of error; a traceback only for unexpected ones."""
    import traceback

    where = f"[rank {launch.rank}] " if launch.world_size > 1 else ""
    if isinstance(error, RecipeError):  # the same on every rank
        return f"recipe error: {error}", 2
    if isinstance(error, KeyboardInterrupt):
        return f"{where}interrupted", 130
    try:
        from megatron_vlm.data.dataset_stream import NoUsableSamples
        from megatron_vlm.training.checkpoint import CheckpointError
        from megatron_vlm.training.loop import TrainingStopped
    except ImportError:  # the error may be this very import failing: report it as it is
        pass
    else:
        for kind, label, code in ((TrainingStopped, "training stopped", 3),
                                  (CheckpointError, "checkpoint error", 4),
                                  (NoUsableSamples, "data error", 5)):
            if isinstance(error, kind):
                return f"{where}{label}: {error}", code
    trace = "".join(traceback.format_exception(error)).rstrip()
    return f"{where}failed:\n{trace}", 1


def resolve_recipe(recipe_path, checkpoint, overrides: list):
    """The recipe to train with: ``recipe_path`` (with overrides), else the one saved in
    ``checkpoint``; with ``checkpoint``, ``checkpoint.dir`` is its root. Its model config is
    checked against the checkpoint it resumes (``checkpoint_meta.check_model_config``)."""
    from pathlib import Path

    from megatron_vlm.training import checkpoint_meta

    overrides = list(overrides)
    if checkpoint:
        root = Path(checkpoint)
        if (root / "meta.json").is_file():  # a step directory: its root holds the run
            root = root.parent
        if not root.is_dir():
            raise RecipeError(f"--checkpoint {checkpoint}: no such directory")
        overrides.append(f"checkpoint.dir={root}")
    if recipe_path:
        recipe = load_recipe(recipe_path, overrides)
    else:
        found = checkpoint_meta.newest(checkpoint)
        if found is None:
            raise RecipeError(f"--checkpoint {checkpoint}: no checkpoint with "
                              f"{checkpoint_meta.FILE} (older checkpoints): pass --recipe")
        recipe = checkpoint_meta.recipe_from(found[1], overrides)
    checkpoint_meta.check_model_config(recipe, recipe.checkpoint.dir)
    return recipe


def _run(args) -> int:
    from megatron_vlm.distributed import read_launch_env, watch_for_failures

    recipe = resolve_recipe(args.recipe, args.checkpoint, args.overrides)
    if args.validate_only:
        from megatron_vlm.training.recipe import check_against_world, check_paths

        check_paths(recipe)
        world = args.world_size or read_launch_env().world_size
        dp = check_against_world(recipe, world)
        print(f"{args.recipe or recipe.source}: ok ({world} ranks, data-parallel {dp})")
        return 0
    from megatron_vlm.training.loop import run

    stop_watching = watch_for_failures(read_launch_env())
    try:
        summary = run(recipe)
    finally:
        stop_watching()
    if summary.get("stopped"):
        # Not finished: a non-zero exit keeps job chains (Slurm afterok) from moving on;
        # running the same command again resumes from the checkpoint just written.
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":  # the guard matters: dist_checkpointing spawns worker processes
    sys.exit(main())
