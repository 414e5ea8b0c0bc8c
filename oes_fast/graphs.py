"""A step of a loop run from one CUDA graph, for the search (mask_search.GraphedSearchStep) and
the training (train_dense / train_sparse(cuda_graph=True))."""
import torch


class GraphedStep:
    """`body()` run from one CUDA graph: the first `warmup` calls run it eagerly on a side stream
    (real steps: Triton compiles, cuDNN picks its algorithms, the gradients get their buffers),
    the next one captures it and every call from then on replays it. Returns what `body` returns:
    from the graph, the capture's device tensors, which the next call overwrites. Everything the
    body reads that changes from step to step must live in device tensors (a capturable
    optimizer keeps its count there), and nothing in it may wait for the device."""

    def __init__(self, body, warmup: int = 3):
        self.body, self.warmup, self.calls = body, int(warmup), 0
        self.graph, self.outputs = None, None

    def __call__(self):
        if self.graph is None and self.calls < self.warmup:
            self.calls += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.body()
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records the body; nothing runs yet
                self.outputs = self.body()
        self.graph.replay()
        return self.outputs
