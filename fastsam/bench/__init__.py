"""The main job: step throughput of fastsam's SAM and its variants against their peers, and the forward + backward
time of its fused CVaR loss against its peers (``python -m fastsam.bench``).

shapes: the parameter shapes of the benchmark models; peers: SAM's compared implementations (loop, foreach,
the compiled foreach step); family_peers: those of Friendly SAM, CR-SAM and LastSAM; po_peers: the
pytorch-optimizer package's classes; methods: the benchmarked methods, their rows, step calls and words per
parameter; stream: the STREAM-style kernels of the bandwidth limit; cvar_peers: the CVaR losses compared (a
torch.topk composite, the authors' lambda search) and the CVaR rows; brent: Brent's bounded minimisation
(scipy's fminbound) for the authors' search; timing: paired rounds and GPU launch counts; report: the tables
and the JSON record; cli: the command line.
"""
