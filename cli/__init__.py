"""The ``xpeft`` command: the top of the import graph, a thin layer over every package.

It may import ``xpeft.adapters``, ``xpeft.profiles`` and ``xpeft.server``; none of them imports
it. Each command module registers its subcommands and imports its heavy dependencies only when
a command runs, so ``xpeft --help`` stays fast.
"""
