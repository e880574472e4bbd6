"""The main job: step throughput of fastsam's SAM and its variants against their peers, and the forward + backward
time of its fused CVaR loss against its peers (``python -m fastsam.bench``).

shapes: the parameter shapes of the benchmark models; peers: SAM's compared implementations (loop, foreach);
family_peers: those of Friendly SAM, CR-SAM and LastSAM; methods: the benchmarked methods, their step calls and
bandwidth limits; cvar_peers: the CVaR losses compared (a torch.topk composite, the authors' lambda search) and
the CVaR rows; brent: Brent's bounded minimisation (scipy's fminbound) for the authors' search; timing: step
timing and copy bandwidth; report: the tables and the JSON record; cli: the command line.
"""
