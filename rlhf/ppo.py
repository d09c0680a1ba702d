"""The RL stage's former name: ``rlhf.rl`` holds the one loop for PPO and the critic-free
algorithms (GRPO, Dr. GRPO, RLOO, GSPO, DAPO, CISPO). Kept so that ``from rlhf.ppo import ...``
(benchmarks/e2e_ppo.py, older scripts) goes on working; new code imports ``rlhf.rl``."""

from rlhf.rl import *  # noqa: F403
from rlhf.rl import __all__  # noqa: F401
