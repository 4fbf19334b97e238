"""A swarm laboratory: real hosts as Linux network namespaces on shaped links, and dedloc processes
on them that tests and benchmarks can kill, pause, restart and cut off (see :mod:`.network`)."""
