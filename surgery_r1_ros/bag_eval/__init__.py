"""The node-in-the-loop evaluation harness behind ``surgery-r1 bag eval`` (and the demo).

``plan`` maps ground-truth questions to bag images, ``run`` starts or finds the node, plays the bag and asks
them (``client``), and ``report`` scores the answers with the shared ``scoring`` and writes the files.
Reading, playing, recording and synthesizing bags is ``surgery_r1_ros.bag``.
"""

from surgery_r1_ros.bag_eval.run import BagEvaluation, EvalOptions, EvalResult, run_eval

__all__ = ["BagEvaluation", "EvalOptions", "EvalResult", "run_eval"]
