"""serforget ClientApp: one speaker's device (Flower Message API).

Handlers are glue: every step they take is a function of ``common`` that the CLI calls too.
- ``train``: FedAvg local training on the node's recordings minus requested deletions; the
  reply also carries the node's MAS importance map for the server's elastic constraint when
  the server asks for it (config ``importance``; the server asks in the last round only).
- ``evaluate``: accuracy of the global model on the node's remaining recordings.
- ``query.pending``: which deletion requests wait on this node.
- ``query.unlearn``: forget-set-only unlearning of the pending requests on the global model,
  the delta HPKE-sealed to the ServerApp and signed by the node.
- ``query.release``: adopt the release that applied the requests, then purge their audio - only
  once its signed manifest verifies against the pinned ``keys/server_sign.pub`` and lists them.
"""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from serforget.client.node import (
    adopt_release,
    load_forget_set,
    load_training_set,
    pinned_release_key,
    requests_to_unlearn,
    seal_unlearning_delta,
    verify_announced_release,
)
from serforget.client.runtime import (
    model_from,
    node_device,
    node_dir,
    node_info,
    pinned_server_key,
    settings,
)
from serforget.common.checkpoint import state_sha256
from serforget.common.labels import task_labels
from serforget.common.protocol import (
    ARRAYS,
    BASE_SHA256,
    BASE_VERSION,
    CONFIG,
    ENVELOPE,
    IMPORTANCE,
    METRICS,
    N_UTTS,
    NODE_ID,
    NODE_INFO,
    NUM_EXAMPLES,
    PENDING,
    QUERY_PENDING,
    QUERY_RELEASE,
    QUERY_UNLEARN,
    RELEASE_MANIFESTS,
    RELEASE_SIGNATURES,
    RELEASE_VERSION,
    REQUEST_IDS,
    RETRY_REASON,
    RETRY_REQUEST_IDS,
    SERVER_ROUND,
    TARGET_FORGET_ACC,
    WANT_IMPORTANCE,
)
from serforget.common.traffic import travelling
from serforget.common.training import TrainConfig, evaluate_model, train_model
from serforget.common.unlearning import mas_importance, unlearn

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = settings(context)
    device, note = node_device(cfg)
    labels, node = task_labels(cfg.task), node_dir(context, cfg)
    model, keys = model_from(msg.content[ARRAYS], cfg, msg.content[CONFIG])
    data = load_training_set(node, labels=labels, clip_seconds=cfg.clip_seconds)
    loss = float("nan")
    if len(data):
        round_no = int(msg.content[CONFIG].get(SERVER_ROUND, 0))
        tc = TrainConfig(
            epochs=cfg.local_epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            seed=cfg.seed + round_no,
            device=device,
            select_best=False,
            cache_frontend=True,
        )
        loss = train_model(model, data, config=tc, progress=False).epochs[-1]["train_loss"]
    reply = RecordDict(
        {
            ARRAYS: ArrayRecord(travelling(model.cpu().state_dict(), keys)),
            METRICS: MetricRecord({NUM_EXAMPLES: len(data), "train-loss": loss}),
            NODE_INFO: node_info(node, device, note),
        }
    )
    if msg.content[CONFIG].get(WANT_IMPORTANCE, True):  # the server keeps only its last round's maps
        sample = data.subset(range(min(len(data), cfg.importance_max_utts)))
        importance = (
            mas_importance(model, sample, device=device)
            if len(sample)
            else {k: v.detach().cpu() * 0 for k, v in model.named_parameters() if v.requires_grad}
        )
        reply[IMPORTANCE] = ArrayRecord({k: v.detach().cpu() for k, v in importance.items()})
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg = settings(context)
    labels = task_labels(cfg.task)
    data = load_training_set(node_dir(context, cfg), labels=labels, clip_seconds=cfg.clip_seconds)
    report = (
        evaluate_model(
            model_from(msg.content[ARRAYS], cfg, msg.content[CONFIG])[0], data, labels=labels, device=cfg.device
        )
        if len(data)
        else {"wa": 0.0}
    )
    return Message(
        RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: len(data), "eval-acc": float(report["wa"])})}), reply_to=msg
    )


@app.query(QUERY_PENDING)
def pending(msg: Message, context: Context) -> Message:
    node = node_dir(context, settings(context))
    requests = requests_to_unlearn(node)
    return Message(
        RecordDict(
            {
                PENDING: ConfigRecord(
                    {
                        NODE_ID: node.node_id,
                        REQUEST_IDS: [r.request_id for r in requests] or [""],
                        N_UTTS: sum(len(r.utt_ids) for r in requests),
                    }
                )
            }
        ),
        reply_to=msg,
    )


@app.query(QUERY_UNLEARN)
def unlearn_pending(msg: Message, context: Context) -> Message:
    cfg, conf = settings(context), msg.content[CONFIG]
    device, note = node_device(cfg)
    labels, node = task_labels(cfg.task), node_dir(context, cfg)
    base_state = msg.content[ARRAYS].to_torch_state_dict()
    if state_sha256(base_state) != conf[BASE_SHA256]:
        raise ValueError("global model received does not match the announced base-sha256")
    requests = requests_to_unlearn(node)
    forget = load_forget_set(node, requests, labels=labels, clip_seconds=cfg.clip_seconds)
    ucfg = cfg.device_unlearn_config(target_forget_acc=float(conf[TARGET_FORGET_ACC]), device=device)
    result = unlearn(model_from(msg.content[ARRAYS], cfg, conf)[0], forget, method=cfg.unlearn_method, config=ucfg)
    start = time.perf_counter()
    sealed = seal_unlearning_delta(
        node=node,
        requests=requests,
        base_state=base_state,
        unlearned=result.model.cpu(),
        base_version=int(conf[BASE_VERSION]),
        server_hpke_public=pinned_server_key(node),
        n_forget=len(forget),
        metrics={},
    )
    return Message(
        RecordDict(
            {
                ENVELOPE: ConfigRecord({ENVELOPE: sealed.envelope, NODE_ID: node.node_id}),
                METRICS: MetricRecord(
                    {
                        "n-forget": len(forget),
                        "unlearn-s": result.seconds,
                        "seal-s": time.perf_counter() - start,
                        "forget-acc-before": result.forget_acc_trajectory[0],
                        "forget-acc-after": result.forget_acc,
                        "steps": result.steps,
                        "envelope-bytes": len(sealed.envelope),
                    }
                ),
                NODE_INFO: node_info(node, device, note),
            }
        ),
        reply_to=msg,
    )


@app.query(QUERY_RELEASE)
def adopt(msg: Message, context: Context) -> Message:
    cfg, conf = settings(context), msg.content[CONFIG]
    labels, node = task_labels(cfg.task), node_dir(context, cfg)
    version, (model, _) = int(conf[RELEASE_VERSION]), model_from(msg.content[ARRAYS], cfg, conf)
    signed = list(zip(conf[RELEASE_MANIFESTS], conf[RELEASE_SIGNATURES]))
    # what counts as applied comes from the signed manifests, never from the unsigned id list
    _, signed_applied = verify_announced_release(
        model=model, version=version, signed_manifests=signed, server_public_key=pinned_release_key(node)
    )
    with node.open_ledger() as ledger:
        retry = [
            r
            for r in ledger.all()
            if r.state == "unlearned"
            and r.request_id in set(conf[RETRY_REQUEST_IDS])
            and r.request_id not in signed_applied
        ]
        for request in retry:
            ledger.mark_retry(request.request_id, reason=str(conf.get(RETRY_REASON, "rejected by the server")))
        applied = [r for r in ledger.all() if r.request_id in signed_applied]
    forget = load_forget_set(node, applied, labels=labels, clip_seconds=cfg.clip_seconds)
    forget_acc = float(evaluate_model(model, forget, labels=labels, device=cfg.device)["wa"]) if len(forget) else -1.0
    receipts = adopt_release(node=node, model=model.cpu(), labels=labels, version=version, signed_manifests=signed)
    return Message(
        RecordDict(
            {
                METRICS: MetricRecord(
                    {
                        "forget-acc-release": forget_acc,
                        "n-forget": len(forget),
                        "purged-files": sum(len(r["files"]) for r in receipts),
                        "retried": len(retry),
                    }
                )
            }
        ),
        reply_to=msg,
    )
