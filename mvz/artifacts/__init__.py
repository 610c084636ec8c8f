"""What ``export`` writes and ``engines`` reads, in one place both import (and which imports neither):

* :mod:`mvz.artifacts.manifest`: the export manifest (``mvz_export.json``), its hashes and request checks;
* :mod:`mvz.artifacts.graphs`: the graph I/O specs (names, shapes, dtypes, sample inputs, profiles);
* :mod:`mvz.artifacts.refit_plan`: the refit map's reader and the all-or-nothing refit plan;
* :mod:`mvz.artifacts.compare`: the numeric comparison and tolerances of parity and engine checks.
"""
