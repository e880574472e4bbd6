"""The main job: step throughput of fastsam's SAM and its variants against their peers (``python -m fastsam.bench``).

shapes: the parameter shapes of the benchmark models; peers: SAM's compared implementations (loop, foreach);
family_peers: those of Friendly SAM, CR-SAM and LastSAM; methods: the benchmarked methods, their step calls and
bandwidth limits; timing: step timing and copy bandwidth; report: the table and the JSON record; cli: the command
line.
"""
