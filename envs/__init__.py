"""Text environments for agents (BabyAI through minigrid), policies, and rollout collection.

envs.base: TextEnv / Policy interfaces, run_episode, continue_rollouts (generic, no minigrid).
envs.babyai: BabyAITextEnv. envs.policies: expert, noisy expert, random. envs.rollout + envs.cli: `agentprm rollout`.
"""
