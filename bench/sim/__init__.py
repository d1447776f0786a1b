"""Discrete-event simulator of a DynaServe cluster in virtual time.

The simulator runs the real local scheduler (:class:`workers.local_scheduler.LocalScheduler`) inside every
simulated instance and the real global policies (:mod:`broker.scheduler`) on the broker side, fed by load
reports produced every ``report_interval_ms`` of virtual time. Step durations come from the model's
step-latency model (or the detailed kernel-table model as ground truth). Results are the same
:class:`dynaserve.metrics.RequestRecord` objects a live replay writes, so :func:`dynaserve.metrics.summarize`
applies unchanged.

Modules: ``config`` (frozen settings), ``instance`` (one simulated engine), ``simulator`` (event loop and
broker), ``oracle`` (upper-bound policy), ``predictors`` (noisy-oracle length predictor), ``policies``
(policy variants under study), ``workloads`` and ``study`` (the goodput study CLI).
"""
