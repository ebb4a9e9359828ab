// Runs probe prompts through real llama.cpp (node-llama-cpp's prebuilt binaries).
// stdin: {"model": path, "threads": 1, "prompts": [[ids]], "answers": [[ids]], "max_new_tokens": n,
//         "stops": [ids], "texts": [str], "flash_attention": false | true | "auto", "kv_cache_type": null | "F32"}
// stdout: {"greedy": [[ids]], "forced_top1": [[ids]], "tokens": [[ids]], "eog": [i], "seconds": s,
//          "greedy_seconds": s, "max_rss_bytes": n, "context": {"flash_attention": b, "kv_cache_types": [k, v]}}
// greedy: llama.cpp's own greedy answer; forced_top1: its argmax at each position of the
// source's answer (teacher forcing); tokens: llama.cpp's tokenization of each text.
// Optional, for benchmarks: "score": [[ids]] -> "score": [{"logprobs": [..], "top1": [..]}], the log-probability
// of each window token after the ones before it (positions 1..n-1) and the argmax there; "generate_texts": [str]
// with "generate_tokens": n -> "generated": [[ids]] (greedy), "generate_prompts": [[ids]] (llama.cpp's tokens),
// "generate_seconds"; "rss_after_probes_bytes": peak RSS once the probes ran, before scoring's big allocations.
import {readFileSync} from "node:fs";
import {getLlama} from "node-llama-cpp";

// This process's own peak RSS: VmHWM starts afresh at exec, while maxRSS keeps the parent's RSS at fork
// (Linux), which is a whole transformers model when tunelab runs this runner.
function peakRssBytes() {
    try {
        const match = /VmHWM:\s+(\d+) kB/.exec(readFileSync("/proc/self/status", "utf8"));
        if (match) return Number(match[1]) * 1024;
    } catch {}
    return process.resourceUsage().maxRSS * 1024;
}

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const job = JSON.parse(Buffer.concat(chunks).toString("utf8"));

const llama = await getLlama({build: "never", gpu: false, logLevel: "error"});
const model = await llama.loadModel({modelPath: job.model, gpuLayers: 0});
const generatePrompts = (job.generate_texts ?? []).map((text) => Array.from(model.tokenize(text, true)));
const longest = Math.max(...job.prompts.map((p, i) => p.length + Math.max(job.answers[i].length, job.max_new_tokens)),
                         ...(job.score ?? []).map((w) => w.length),
                         ...generatePrompts.map((p) => p.length + (job.generate_tokens ?? 32)));
// Flash attention and the KV cache type are the caller's choice: with flash attention on, llama.cpp's CPU
// decode steps (one query row) and the batched teacher-forced pass take different attention kernels that
// round differently, so greedy decoding can flip a near tie the teacher-forced pass gets right.
const options = {contextSize: Math.max(256, longest + 8), threads: job.threads ?? 1, sequences: 1,
                 flashAttention: job.flash_attention ?? "auto"};
if (job.kv_cache_type) {
    options.experimentalKvCacheKeyType = job.kv_cache_type;
    options.experimentalKvCacheValueType = job.kv_cache_type;
}
const context = await model.createContext(options);
const sequence = context.getSequence();
const stops = new Set(job.stops ?? []);
const started = Date.now();
const greedy = [];
const forced = [];
let greedySeconds = 0;
for (let i = 0; i < job.prompts.length; i++) {
    const prompt = job.prompts[i];
    const answer = job.answers[i];
    await sequence.clearHistory();
    const out = [];
    const greedyStarted = Date.now();
    for await (const token of sequence.evaluate(prompt, {temperature: 0})) {
        out.push(token);
        if (stops.has(token) || out.length >= Math.max(answer.length, 1)) break;
    }
    greedySeconds += (Date.now() - greedyStarted) / 1000;
    greedy.push(out);
    await sequence.clearHistory();
    const input = prompt.concat(answer.slice(0, -1)).map((token, position) =>
        position >= prompt.length - 1 ? [token, {generateNext: {token: true, options: {temperature: 0}}}] : token);
    const result = await sequence.controlledEvaluate(input);
    const top1 = [];
    for (let position = prompt.length - 1; position < input.length; position++)
        top1.push(result[position]?.next?.token ?? -1);
    forced.push(answer.length ? top1 : []);
}
const rssAfterProbes = peakRssBytes();
const score = [];
for (const window of job.score ?? []) score.push(await scoreWindow(window));
const generated = [];
const generateStarted = Date.now();
for (const prompt of generatePrompts) {
    await sequence.clearHistory();
    const out = [];
    for await (const token of sequence.evaluate(prompt, {temperature: 0})) {
        out.push(token);
        if (stops.has(token) || out.length >= (job.generate_tokens ?? 32)) break;
    }
    generated.push(out);
}
const generateSeconds = (Date.now() - generateStarted) / 1000;
const tokens = (job.texts ?? []).map((text) => Array.from(model.tokenize(text, true)));
// where llama.cpp's own end-of-generation set would have ended each source answer (-1: nowhere)
const eog = job.answers.map((answer) => answer.findIndex((token) => model.isEogToken(token)));
process.stdout.write(JSON.stringify({greedy, forced_top1: forced, tokens, eog, seconds: (Date.now() - started) / 1000,
                                     greedy_seconds: greedySeconds,
                                     max_rss_bytes: peakRssBytes(),
                                     rss_after_probes_bytes: rssAfterProbes, score, generated,
                                     generate_prompts: generatePrompts, generate_seconds: generateSeconds,
                                     context: {flash_attention: context.flashAttention,
                                               kv_cache_types: [context.kvCacheKeyType ?? null,
                                                                context.kvCacheValueType ?? null]}}));
await context.dispose();
await model.dispose();
await llama.dispose();

// The full next-token distribution at every position, read off the raw logits: with temperature 0
// node-llama-cpp's greedy sampler leaves them untouched and the probabilities are their plain softmax.
async function scoreWindow(window) {
    await sequence.clearHistory();
    const input = window.slice(0, -1).map((token) =>
        [token, {generateNext: {probabilities: true, options: {temperature: 0}}}]);
    const result = await sequence.controlledEvaluate(input);
    const logprobs = [];
    const top1 = [];
    for (let i = 0; i < input.length; i++) {
        const probabilities = result[i]?.next?.probabilities;
        // a float32 softmax can underflow to 0 for a hopeless token; keep the log finite (JSON has no -Infinity)
        logprobs.push(Math.log(Math.max(probabilities?.get(window[i + 1]) ?? 0, 1e-45)));
        top1.push(probabilities ? probabilities.keys().next().value : -1);
    }
    return {logprobs, top1};
}
