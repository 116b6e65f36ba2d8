"""What the CUDA-graph tests share: stand-ins that take the graph path on the CPU."""
import torch

from model.train_graphs import Captured, TrainingGraphs


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
        self.named = tuple(zip(c.names, c.params))

    def replay(self):
        with torch.no_grad(), self.graphs.autocast("cpu"):
            for out, new in zip(self.c.outputs, self.graphs.trunk_on_aliases(self.named, self.c.input_ids,
                                                                              self.c.inputs)[0]):
                out.copy_(new)


class StandInBackward(StandInForward):
    def replay(self):
        with torch.enable_grad(), self.graphs.autocast("cpu"):
            outs, aliases = self.graphs.trunk_on_aliases(self.named, self.c.input_ids, self.c.inputs)
            self.graphs.add_gradients(outs, aliases, self.c.grad_outputs, self.c.grad_sums)


class TrainingStandIn(OnGraphPath, TrainingGraphs):
    """model/train_graphs.TrainingGraphs on the graph path on the CPU: its graphs are stand-ins that
    recompute into the captured buffers, under the autocast a capture records (on the CPU); counts captures."""

    def capture(self, input_ids):
        self.captures += 1
        named = self.trunk_parameters()
        params = tuple(p for _, p in named)
        with torch.no_grad(), self.autocast("cpu"):
            outs = tuple(o.clone() for o in self.model.eager_trunk(input_ids))
        # sums full of NaN, as a real capture leaves its warm-ups' sums: the first replay must zero them
        c = Captured(input_ids.clone(), outs, tuple(torch.empty_like(o) for o in outs), params,
                     self.graph_inputs(named), tuple(torch.full_like(p, float("nan")) for p in params), None,
                     None, tuple(n for n, _ in named), tuple(p.data_ptr() for p in params))
        c.forward, c.backward = StandInForward(self, c), StandInBackward(self, c)
        return c
