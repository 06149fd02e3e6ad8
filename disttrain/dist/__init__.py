"""The process plumbing: the Accelerator and its process group (runtime), the precision every rank
agrees on (precision), the cores, threads and loader workers of each rank (cores), and the job's
own gloo group for unbounded waits (jobgroup). Imports only disttrain.config below it."""
