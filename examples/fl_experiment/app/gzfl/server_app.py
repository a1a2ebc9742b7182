"""ServerApp: FedAvg through gradzip's strategy wrapper, central evaluation on the test set."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from gradzip.integrations.flower import GradzipStrategy, warm_up

from .task import Net, evaluate, load_arrays, test_set

torch.set_num_threads(1)
warm_up()  # load gradzip's numba kernels once per process, outside the measured codec time
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    clients = int(cfg["num-clients"])
    torch.manual_seed(int(cfg["seed"]))
    model = Net()
    x_test, y_test = test_set(str(cfg["data-file"]))
    accuracy: dict[int, float] = {}
    round_end: dict[int, float] = {}

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        load_arrays(model, {name: array.numpy() for name, array in arrays.items()})
        loss, acc = evaluate(model, x_test, y_test)
        accuracy[server_round] = acc
        round_end[server_round] = time.time()
        return MetricRecord({"accuracy": acc, "loss": loss})

    strategy = GradzipStrategy(FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients,
                                      min_available_nodes=clients))
    train_config = ConfigRecord({"lr": float(cfg["lr"]), "local-epochs": int(cfg["local-epochs"])})
    initial = ArrayRecord(model.state_dict())
    broadcast_bytes = sum(len(array.data) for array in initial.values())
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=int(cfg["num-rounds"]),
                   train_config=train_config, evaluate_fn=central_evaluate)
    out = Path(str(cfg["out-file"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"config": dict(cfg), "accuracy": accuracy, "round_end_time": round_end,
              "broadcast_bytes": broadcast_bytes,
              "replies": strategy.stats_by_round()}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
