"""xpeft.training: training a profile (its methods and baselines), its abstention rule, evaluation
and the training data; above the profiles and the serving runtime, below the server."""
