"""Training as a service: job records, the queue, the trainer that runs jobs, and its process.

The server validates a training request and queues it; a trainer process (``xpeft worker``, or
the one ``xpeft serve`` starts beside itself with the embedded store) trains it with the
library's own ``train_profile`` and stores the result exactly as ``PUT`` would. Job records live
in the profile store's backend, so any replica answers ``GET /jobs``.
"""
