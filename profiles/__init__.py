"""xpeft.profiles: masks, training, baselines, the .xpm format, and evaluation."""
