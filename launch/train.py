"""Train an image classifier with disttrain.

    accelerate launch launch/train.py --config configs/demo.yaml                     # accelerate's config
    accelerate launch --multi_gpu --num_processes 2 launch/train.py --config configs/demo.yaml
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml launch/train.py --config configs/demo.yaml
    torchrun --nproc_per_node 2 launch/train.py --config configs/demo.yaml
    python launch/train.py --config configs/demo.yaml optim.lr=3e-3 train.epochs=1    # one process, GPU or CPU
    accelerate launch launch/train.py --config configs/demo.yaml --find-lr            # only the LR sweep
    accelerate launch launch/train.py --config configs/demo.yaml optim.lr=auto        # sweep, then train at it

Overrides are `section.key=value`; the resolved config is written to <output_dir>/<run.name>/config.yaml.
"""

import sys


def main(argv=None) -> int:
    import signal

    # a preemption signal (SIGUSR1, SLURM's warning) that comes while the modules below load is held,
    # not lost, and neither is it taken by a thread they start: the run's PreemptionFlag takes it
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    # imported here, not at the top: loader workers import this script again, and need none of it
    from disttrain.cli import run_user_errors, train
    from disttrain.cli.parsers import parse_with_overrides, train_parser
    from disttrain.models.checks import load_config

    args = parse_with_overrides(train_parser(), argv)
    return run_user_errors(lambda: train(load_config(args.config, args.overrides), find_lr_only=args.find_lr))


if __name__ == "__main__":
    sys.exit(main())
