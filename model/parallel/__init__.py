"""Data-parallel training (issue 19): the parts that need no GPU, and the thin NCCL adapter.

``launch``       who this process is (torchrun, SLURM or ``ptxgen train --gpus N``), checked once
``rendezvous``   rank 0 hands every rank the same opaque id bytes (NCCL's unique id) over TCP
``comm``         the ``Communicator`` interface and ``LocalGroup``, in-process ranks on threads
``nccl``         the same interface over nccl4py (optional extra ``distributed``)
``spawn``        ``ptxgen train --gpus N``: the N rank processes, watched as one run
``batch``        each rank's rows of the global batch
``shards``       ZeRO-1 over the flat parameter layout: padded buckets, each rank's piece of each
``replicas``     the weights' digest, exchanged to prove the ranks hold the same bits
``zero_numpy``   a ZeRO-1 step on the numpy backend: the protocol, checked against one process
``zero_cuda``    the same step on the GPU, its collectives host steps of the training plan
``checkpoints``  the moments gathered from the shards, one process's checkpoint written by rank 0
"""
