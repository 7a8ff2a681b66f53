#!/usr/bin/env node
// Audio in, audio out over chat completions with the official `openai` npm SDK: the request a Node.js app
// sends to NVIDIA NIM or a vLLM server for Phi-4-multimodal (system prompt, history, an input_audio part, an
// optional image_url part), pointed at omnivox, which also speaks the answer. Streams by default
// (`delta.audio.transcript` and 24 kHz pcm16 `delta.audio.data`), or asks for one WAV with --no-stream.
//
//   npm ci && node chat_audio_client.mjs --url http://127.0.0.1:8000 --say "What is in this picture?" \
//       --image photo.png --system "Answer in one sentence." --history "user:Hi" --history "assistant:Hello!"

import { readFileSync, writeFileSync } from 'node:fs';
import { extname } from 'node:path';
import { parseArgs } from 'node:util';

import OpenAI from 'openai';

import { REALTIME_RATE, decodeWav, encodeWav, pcm16Samples, readWavFile, resample, synthesizeSpeech } from './lib/audio.mjs';

const USAGE = `One chat completion with audio in and audio out (openai npm SDK).

options:
  --url URL           server root (default $OMNIVOX_URL or http://127.0.0.1:8000; /v1 is added)
  --model NAME        model name (default: the first of the server's /v1/models)
  --api-key KEY       Bearer key (default $OMNIVOX_API_KEY, $OPENAI_API_KEY or sk-local)
  --wav FILE          the caller's speech: a 16-bit PCM WAV, sent as an input_audio part
  --say TEXT          the caller's speech spoken by espeak-ng (default "What is the weather like today?")
  --text TEXT         a text part after the audio (e.g. "Answer the question in the audio.")
  --image FILE        a PNG or JPEG sent as an image_url data URL
  --system TEXT       the system message
  --history ROLE:TEXT an earlier turn (repeatable, in order): user:... or assistant:...
  --voice NAME        the voice (default alloy)
  --out FILE          where the answer is saved as a 24 kHz WAV (default answer.wav)
  --no-stream         one response with the whole answer (format wav) instead of a stream`;

function options(argv) {
  const { values } = parseArgs({
    args: argv,
    options: {
      url: { type: 'string', default: process.env.OMNIVOX_URL ?? 'http://127.0.0.1:8000' },
      model: { type: 'string' },
      'api-key': { type: 'string', default: process.env.OMNIVOX_API_KEY ?? process.env.OPENAI_API_KEY ?? 'sk-local' },
      wav: { type: 'string' },
      say: { type: 'string', default: 'What is the weather like today?' },
      text: { type: 'string' },
      image: { type: 'string' },
      system: { type: 'string' },
      history: { type: 'string', multiple: true, default: [] },
      voice: { type: 'string', default: 'alloy' },
      out: { type: 'string', default: 'answer.wav' },
      'no-stream': { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  return values;
}

/** The messages: system, earlier turns, then the caller's turn (audio, optional text and image). */
export function buildMessages({ system, history, audioWav, text, image }) {
  const messages = system ? [{ role: 'system', content: system }] : [];
  for (const turn of history) {
    const [role, ...rest] = turn.split(':');
    if (role !== 'user' && role !== 'assistant') throw new Error(`--history wants user:TEXT or assistant:TEXT`);
    messages.push({ role, content: rest.join(':') });
  }
  const content = [{ type: 'input_audio', input_audio: { data: audioWav.toString('base64'), format: 'wav' } }];
  if (text) content.push({ type: 'text', text });
  if (image) {
    const mime = extname(image.path).toLowerCase() === '.png' ? 'image/png' : 'image/jpeg';
    content.push({ type: 'image_url', image_url: { url: `data:${mime};base64,${image.data.toString('base64')}` } });
  }
  messages.push({ role: 'user', content });
  return messages;
}

async function main() {
  const args = options(process.argv.slice(2));
  const client = new OpenAI({ baseURL: `${args.url.replace(/\/+$/, '').replace(/\/v1$/, '')}/v1`, apiKey: args['api-key'] });
  const model = args.model ?? (await client.models.list()).data[0].id;
  const caller = args.wav ? readWavFile(args.wav) : synthesizeSpeech(args.say);
  const messages = buildMessages({
    system: args.system,
    history: args.history,
    audioWav: encodeWav(caller, REALTIME_RATE),
    text: args.text,
    image: args.image ? { path: args.image, data: readFileSync(args.image) } : null,
  });
  console.log(`caller: ${(caller.length / REALTIME_RATE).toFixed(2)} s of speech; ${messages.length} messages to ${model}`);
  const started = performance.now();
  const request = { model, messages, modalities: ['text', 'audio'] };
  let transcript = '';
  let samples;
  let firstAudioMs = null;
  if (args['no-stream']) {
    const completion = await client.chat.completions.create({ ...request, audio: { voice: args.voice, format: 'wav' } });
    const audio = completion.choices[0].message.audio;
    transcript = audio.transcript;
    const wav = decodeWav(Buffer.from(audio.data, 'base64'));
    samples = resample(wav.samples, wav.rate, REALTIME_RATE);
  } else {
    const stream = await client.chat.completions.create({
      ...request,
      audio: { voice: args.voice, format: 'pcm16' },
      stream: true,
    });
    const pieces = [];
    for await (const chunk of stream) {
      const audio = chunk.choices[0]?.delta?.audio;
      if (!audio) continue;
      if (audio.transcript) transcript += audio.transcript;
      if (audio.data) {
        firstAudioMs ??= performance.now() - started;
        pieces.push(Buffer.from(audio.data, 'base64'));
      }
    }
    samples = pcm16Samples(Buffer.concat(pieces));
  }
  writeFileSync(args.out, encodeWav(samples, REALTIME_RATE));
  const total = Math.round(performance.now() - started);
  console.log(`answer: ${(samples.length / REALTIME_RATE).toFixed(2)} s of audio, transcript ${JSON.stringify(transcript)}`);
  console.log(`latency: first audio ${firstAudioMs === null ? 'n/a' : `${Math.round(firstAudioMs)} ms`} | done ${total} ms`);
}

if (import.meta.url === `file://${process.argv[1]}`) {
  main().catch((error) => {
    console.error(`chat_audio_client: ${error.message}`);
    process.exit(1);
  });
}
