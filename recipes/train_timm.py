#!/usr/bin/env python
"""Train the paper's models and baselines with timm + kapify.

    python recipes/train_timm.py --config recipes/configs/cifar10_resnet18_kap_s0.1.yaml
    python recipes/train_timm.py --config recipes/configs/cifar10_resnet18_kap_s0.1.yaml --epochs 10 --sigma 0.2
    torchrun --nproc_per_node 4 recipes/train_timm.py --config recipes/configs/imagenet_resnet18wide4_kap.yaml

Options: ``--help`` (every flag of :class:`kapify.training.TrainConfig`); the YAML file sets defaults
and flags override it. Rerunning a command resumes its run from ``<output>/<experiment>/last.pth``.
"""

import sys

from kapify.training import main

if __name__ == "__main__":
    sys.exit(main())
