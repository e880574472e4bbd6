"""The main job: SAM step throughput of fastsam against its peers (``python -m fastsam.bench``).

shapes: the parameter shapes of the benchmark models; peers: the compared SAM implementations;
timing: step timing and copy bandwidth; report: the table and the JSON record; cli: the command line.
"""
