// Serves one GGUF model through real llama.cpp (node-llama-cpp's prebuilt binaries), one JSON object per line.
// argv: model path, threads, context size.
// stdout first: {"ready": true, "context_size": n, "eog": [ids]} (or {"error": text} and exit 1)
// stdin requests, one at a time:
//   {"rows": [{"id": k, "prompt": [ids], "max_tokens": n}, ...], "temperature": t, "top_k": k, "top_p": p,
//    "repeat_penalty": r, "seed": s}
//   -> {"id": k, "token": id} per generated token (an end-of-generation token included), then
//      {"id": k, "done": "eog" | "length" | "cancelled", "seconds": s} per row, then {"batch_done": true}
//   {"cancel": k} ends row k at its next token (the caller saw a stop string or its own limit).
// Rows run one after another on one sequence, and the prompt prefix a row shares with the previous one stays
// in the KV cache: a chat turn only evaluates what is new, an evaluation's shared instruction is evaluated once.
// Not parallel sequences: with node-llama-cpp 3.21.1, rows decoded as parallel sequences of one context
// (fresh or reused) now and then took tokens from each other's prompts ("MRI" text in a CRP answer).
import {createInterface} from "node:readline";
import {getLlama} from "node-llama-cpp";

const [modelPath, threadsText, contextText] = process.argv.slice(2);
const send = (message) => process.stdout.write(JSON.stringify(message) + "\n");

let llama, model, context, sequence;
try {
    llama = await getLlama({build: "never", gpu: false, logLevel: "error"});
    model = await llama.loadModel({modelPath, gpuLayers: 0});
    // Flash attention off: the decode steps then use the kernel the export check verified.
    context = await model.createContext({contextSize: Number(contextText), threads: Number(threadsText),
                                         sequences: 1, flashAttention: false});
    sequence = context.getSequence();
} catch (error) {
    send({error: String(error?.message ?? error).split("\n")[0]});
    process.exit(1);
}
const eog = [];
for (const token of [model.tokens.eos, model.tokens.eot]) if (token != null) eog.push(token);
send({ready: true, context_size: context.contextSize, eog});

const cancelled = new Set();
const pending = [];
let wake = null;
const lines = createInterface({input: process.stdin});
lines.on("line", (line) => {
    if (!line.trim()) return;
    const message = JSON.parse(line);
    if (message.cancel !== undefined) cancelled.add(message.cancel);
    else pending.push(message);
    wake?.();
});
lines.on("close", () => { pending.push(null); wake?.(); });

while (true) {
    if (!pending.length) await new Promise((resolve) => { wake = resolve; });
    wake = null;
    const job = pending.shift();
    if (job === null) break;
    if (job === undefined) continue;
    for (const row of job.rows) await answer(sequence, job, row);
    send({batch_done: true});
}
await context.dispose();
await model.dispose();
await llama.dispose();

async function answer(seq, job, row) {
    const started = Date.now();
    const prompt = row.prompt;
    // keep the shared prefix, but always evaluate at least the prompt's last token
    const keep = Math.min(seq.compareContextTokens(prompt).firstDifferentIndex, prompt.length - 1);
    if (keep < seq.nextTokenIndex)
        await seq.eraseContextTokenRanges([{start: keep, end: seq.nextTokenIndex}]);
    const generated = [];
    const options = {yieldEogToken: true, temperature: job.temperature ?? 0};
    if (options.temperature > 0) {
        if (job.top_k) options.topK = job.top_k;
        if (job.top_p !== undefined && job.top_p < 1) options.topP = job.top_p;
        if (job.seed !== undefined && job.seed !== null) options.seed = job.seed;
    }
    if (job.repeat_penalty && job.repeat_penalty !== 1)
        options.repeatPenalty = {punishTokens: () => prompt.concat(generated), penalty: job.repeat_penalty,
                                 maxPunishTokens: prompt.length + row.max_tokens};
    let reason = "length";
    for await (const token of seq.evaluate(prompt.slice(keep), options)) {
        if (cancelled.has(row.id)) { reason = "cancelled"; break; }
        generated.push(token);
        send({id: row.id, token});
        if (model.isEogToken(token)) { reason = "eog"; break; }
        if (generated.length >= row.max_tokens) break;
    }
    cancelled.delete(row.id);
    send({id: row.id, done: reason, seconds: (Date.now() - started) / 1000});
}
