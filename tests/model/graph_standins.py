"""What the CUDA-graph tests share: stand-ins that take the graph path on the CPU."""
import torch

from model.train_graphs import StageGraphs, TrainingGraphs


class OnGraphPath:
    """Mixin for model/graphs.GraphedDenoiser and model/train_graphs.TrainingGraphs: every input counts as
    a GPU's, so the graph path runs; the subclass's capture builds stand-in graphs and counts itself."""
    captures = 0

    @staticmethod
    def on_gpu(input_ids):
        return True


class StandInForward:
    """Recomputes what the captured graph would, on the parameters' aliases as the real capture does."""
    def __init__(self, graphs, c):
        self.graphs, self.c = graphs, c
        self.named = tuple(zip(c.acc.names, c.acc.params))

    def replay(self):
        with torch.no_grad(), self.graphs.autocast("cpu"):
            for out, new in zip(self.c.outputs, self.graphs.trunk_on_aliases(self.named, self.c.input,
                                                                              self.c.acc.inputs)[0]):
                out.copy_(new)


class StandInBackward(StandInForward):
    def replay(self):
        c = self.c
        with torch.enable_grad(), self.graphs.autocast("cpu"):
            leaf = self.graphs.input_leaf(c)
            outs, aliases = self.graphs.trunk_on_aliases(self.named, leaf, c.acc.inputs)
            self.graphs.add_gradients(outs, aliases, c.grad_outputs, c.acc.grad_sums, leaf, c.grad_input)


class StandInCapture(OnGraphPath):
    """Stand-in graphs that recompute into the captured buffers, under the autocast a capture records (on
    the CPU); counts captures."""

    def capture(self, x):
        self.captures += 1
        fresh = self.acc is None
        c = self.new_slot(x)
        if fresh:   # sums full of NaN, as a real capture could leave them: the first replay must zero them
            for s in c.acc.grad_sums:
                s.fill_(float("nan"))
            c.acc.handed_over = True
        with torch.no_grad(), self.autocast("cpu"):
            c.outputs = tuple(o.clone() for o in self.model.eager_trunk(x))
        c.grad_outputs = tuple(torch.empty_like(o) for o in c.outputs)
        c.forward, c.backward = StandInForward(self, c), StandInBackward(self, c)
        return c


class TrainingStandIn(StandInCapture, TrainingGraphs):
    """model/train_graphs.TrainingGraphs on the graph path on the CPU."""


class StageStandIn(StandInCapture, StageGraphs):
    """model/train_graphs.StageGraphs on the graph path on the CPU."""
