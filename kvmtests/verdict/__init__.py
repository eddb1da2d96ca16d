"""The verdicts: what a run concludes about the kernel under test.

`features` (each feature group of the series detected by behaviour, partial backports and probe
deviations named), `probe` (host identity and capability table), `plugin` (the pytest plugin:
catalog markers, skips, gating, preconditions, kernel health, summary, JSON and JUnit), `report`
(the summary and the KCIDB export from a saved run), `junit` (a saved run as JUnit XML, crashes
included), `compare` and `matrix` (what changed from one saved run to another; several runs side by
side). It imports the machine layer and itself, never the runner or the command line.
"""
