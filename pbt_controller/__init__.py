"""The pbt_controller service: population-based training of a population of SPIRAL members.

* :mod:`pbt_controller.decision`: the pure exploit/explore rule (truncation selection).
* :mod:`pbt_controller.state`: durable state, lineage/report logs and the population plot.
* :mod:`pbt_controller.discovery`: members' addresses (static file or Kubernetes API).
* :mod:`pbt_controller.controller`: reports, decisions, actor assignment, metrics.
* :mod:`pbt_controller.service`: the ``spiral.v1.PBTController`` gRPC servicer.
* :mod:`pbt_controller.main`: ``spiral pbt-controller``.
"""
