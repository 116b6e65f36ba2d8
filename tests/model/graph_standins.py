"""What the CUDA-graph tests share: a stand-in that takes the graph path on the CPU."""


class OnGraphPath:
    """Mixin for model/graphs.GraphedDenoiser and model/train_graphs.TrainingGraphs: every input counts as
    a GPU's, so the graph path runs; the subclass's capture builds stand-in graphs and counts itself."""
    captures = 0

    @staticmethod
    def on_gpu(input_ids):
        return True
