"""lensdyn.app: the top floor. The ``lensdyn`` command line (``cli``), the self-contained HTML report
(``report``) and the corpus workflow (``corpus``: chunks, checkpoints, shards, merge)."""
