"""xpeft.profiles: masks, training, baselines, the .xpm format, evaluation and the CLI."""
