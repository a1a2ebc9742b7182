"""ClientApp: local training on one non-IID partition; replies go through gradzip's Mod."""
from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from gradzip.integrations.flower import GradzipMod, warm_up

from .task import Net, load_arrays, partition, train

torch.set_num_threads(1)
warm_up()  # load gradzip's numba kernels once per process, outside the measured codec time


def codec_mod(msg: Message, context: Context, call_next) -> Message:
    """GradzipMod configured from the run config (codec none | gradzip | sz3, rel error bound)."""
    codec = str(context.run_config["codec"])
    if codec == "none":
        return call_next(msg, context)
    mod = GradzipMod(error_bound=float(context.run_config["error-bound"]), mode="rel", codec=codec)
    return mod(msg, context, call_next)


app = ClientApp(mods=[codec_mod])


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    cfg = context.run_config
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    server_round = int(msg.content["config"]["server-round"])
    seed = int(cfg["seed"])
    x, y = partition(partition_id, num_partitions, float(cfg["alpha"]), seed, str(cfg["data-file"]))
    model = Net()
    load_arrays(model, {name: array.numpy() for name, array in msg.content["arrays"].items()})
    config = msg.content["config"]  # lr and local-epochs come from the server, per round
    loss = train(model, x, y, int(config["local-epochs"]), float(config["lr"]), int(cfg["batch-size"]),
                 seed=seed * 100_003 + partition_id * 1_009 + server_round)
    reply = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                        "metrics": MetricRecord({"train-loss": loss, "num-examples": len(x)})})
    return Message(reply, reply_to=msg)
