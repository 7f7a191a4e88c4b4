#!/usr/bin/env python
"""Direct detection pre-training with Detectron2: pre-train -> bridge -> fine-tune -> evaluate.

One command runs every phase listed in DIRECT_PRETRAIN.PIPELINE, each in its own folder under
the output folder; finished phases are skipped and an interrupted one resumes, so rerunning the
same command always continues where it stopped (--resume is accepted and implied). Configs are
yacs .yaml files (overrides: KEY VALUE) or LazyConfig .py files (overrides: a.b=c).

Examples:
    python train_net.py --config-file configs/trees/faster_rcnn_R_18_FPN_direct.yaml
    python train_net.py --config-file CFG.yaml DIRECT_PRETRAIN.PHASE PRETRAIN   # one phase only
    python train_net.py --config-file CFG.yaml --eval-only MODEL.WEIGHTS out/model_final.pth
    python train_net.py --config-file CFG.py DIRECT_PRETRAIN.PRETRAIN.BASE_LR=0.04
    python train_net.py --config-file CFG.yaml --num-gpus 8
    python train_net.py --config-file configs/planned/faster_rcnn_R_18_FPN.yaml --plan-only
"""

from __future__ import annotations

import json
import logging
import sys
import warnings

# Known, harmless deprecation noise from detectron2 v0.6 on recent torch.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated")
warnings.filterwarnings("ignore", message=r"torch\.meshgrid")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from detectron2.engine import default_argument_parser, default_setup, launch  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from torch.multiprocessing import ProcessExitedException  # noqa: E402

from direct_pretrain.config_systems import load_config  # noqa: E402
from direct_pretrain.config_systems import system_of, user_set_keys  # noqa: E402
from direct_pretrain.engine import StopRequested  # noqa: E402
from direct_pretrain.pipeline import evaluate_weights, plan_run, run_pipeline  # noqa: E402
from direct_pretrain.utils.dist import MainProcessError, build_on_main  # noqa: E402
from direct_pretrain.utils.errors import ConfigError, UserError, stop  # noqa: E402
from direct_pretrain.utils.io import ensure_writable_dir  # noqa: E402
from direct_pretrain.utils.lock import RunLock  # noqa: E402
from direct_pretrain.utils.logger import setup_project_logger  # noqa: E402


def setup(args) -> tuple:
    """Config (yacs .yaml with KEY VALUE options, or LazyConfig .py with a.b=c); the output
    folder's lock (``RunLock``), taken by the main process before anything is written there;
    logging of Detectron2 and of this project to the console and OUTPUT_DIR/log.txt."""
    try:
        cfg = load_config(args.config_file, args.opts)
    except UserError:
        raise
    except (KeyError, ValueError, FileNotFoundError, AssertionError) as e:  # yacs: AssertionError
        reason = e.args[0] if isinstance(e, KeyError) and e.args else e  # str(KeyError) quotes
        raise ConfigError(f"{args.config_file} {' '.join(args.opts)}: {reason}") from e
    output_dir = system_of(cfg).output_dir(cfg)
    if comm.is_main_process():
        ensure_writable_dir(output_dir)
    lock = RunLock(output_dir)
    build_on_main(lock.acquire, "locking OUTPUT_DIR", others_too=False)
    default_setup(cfg, args)
    logger = setup_project_logger(output_dir)
    if args.num_gpus > 1 and not torch.cuda.is_available():
        logger.warning(
            "--num-gpus %d, but no GPU is available: running %d CPU processes (gloo).",
            args.num_gpus,
            comm.get_world_size(),
        )
    return cfg, lock


def main(args) -> dict:
    logger = logging.getLogger("direct_pretrain")
    lock = None
    try:
        cfg, lock = setup(args)
        if args.eval_only:
            result = evaluate_weights(cfg, system_of(cfg).weights(cfg))
        elif args.plan_only:
            result = plan_run(cfg, user_set_keys(args.config_file, args.opts))
        else:
            result = run_pipeline(cfg, user_set_keys(args.config_file, args.opts))
    except StopRequested as e:  # SIGTERM, SIGINT, SIGUSR1: a checkpoint was written
        logger.warning("%s", e)
        _end_processes()
        sys.exit(e.exit_code)
    except (UserError, MainProcessError) as e:  # a refusal: its message says what to do; no
        # traceback (MainProcessError: the main process shows the failure; the others' traceback
        # would only show where they heard of it)
        stop(e, cleanup=_end_processes)
    except Exception as e:  # the reason a run stopped belongs in log.txt too
        logger.error("Stopped: %s: %s", type(e).__name__, e)
        raise
    finally:
        if lock is not None:
            lock.release()  # the process's end would release it too, however it ends
    if not args.eval_only and not args.plan_only and comm.is_main_process():
        logging.getLogger("detectron2").info("Pipeline summary:\n%s", json.dumps(result, indent=1))
    comm.synchronize()
    _end_processes()
    return result


def _end_processes() -> None:
    """Destroy the process group: gloo/NCCL threads left running abort the exit."""
    if comm.get_world_size() > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    parser = default_argument_parser()
    parser.add_argument(
        "--plan-only",
        action="store_true",
        help="with DIRECT_PRETRAIN.BUDGET_MINUTES: print the plan, write OUTPUT_DIR/plan.yaml, "
        "train nothing",
    )
    args = parser.parse_args()
    flags = [opt for opt in args.opts if opt.startswith("--")]
    if flags:  # argparse hands everything after the first override to the overrides
        parser.error(
            f"{' '.join(flags)} must come before the config overrides (KEY VALUE or a.b=c), "
            "e.g. train_net.py --config-file CFG --plan-only KEY VALUE"
        )
    try:
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except ProcessExitedException as e:  # a worker exited with a status after saying why
        if e.exit_code is None:  # killed by a signal: the spawner's message is all there is
            raise
        print(f"train_net.py: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
