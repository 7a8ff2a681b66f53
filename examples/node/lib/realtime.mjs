// What a Realtime client needs besides a socket: the GA and beta event names, the session.update that
// switches to manual turns, and an event log that waits for events and collects the spoken answer.

import { REALTIME_RATE, appendEvents, pcm16Samples } from './audio.mjs';

/** Event names that differ between the GA API and the beta one (`OpenAI-Beta: realtime=v1`). */
export const DIALECTS = {
  ga: {
    audioDelta: 'response.output_audio.delta',
    audioDone: 'response.output_audio.done',
    transcriptDelta: 'response.output_audio_transcript.delta',
    transcriptDone: 'response.output_audio_transcript.done',
    itemCreated: 'conversation.item.added',
  },
  beta: {
    audioDelta: 'response.audio.delta',
    audioDone: 'response.audio.done',
    transcriptDelta: 'response.audio_transcript.delta',
    transcriptDone: 'response.audio_transcript.done',
    itemCreated: 'conversation.item.created',
  },
};

/** `http://h:p/x` or `ws://h:p/x` -> both spellings, without a trailing slash. */
export function serverBase(url) {
  const parsed = new URL(url);
  const secure = parsed.protocol === 'https:' || parsed.protocol === 'wss:';
  const rest = `${parsed.host}${parsed.pathname.replace(/\/+$/, '')}`;
  return { http: `${secure ? 'https' : 'http'}://${rest}`, ws: `${secure ? 'wss' : 'ws'}://${rest}`, secure };
}

/** Manual turns (no server VAD), PCM16 24 kHz both ways: the client decides when the caller is done. */
export function manualSessionUpdate(dialect, { voice, instructions } = {}) {
  const extra = { ...(voice ? { voice } : {}), ...(instructions ? { instructions } : {}) };
  if (dialect === 'beta') {
    return {
      type: 'session.update',
      session: {
        modalities: ['text', 'audio'],
        input_audio_format: 'pcm16',
        output_audio_format: 'pcm16',
        turn_detection: null,
        ...extra,
      },
    };
  }
  const pcm = { type: 'audio/pcm', rate: REALTIME_RATE };
  return {
    type: 'session.update',
    session: {
      type: 'realtime',
      output_modalities: ['audio'],
      ...(instructions ? { instructions } : {}),
      audio: {
        input: { format: pcm, turn_detection: null },
        output: { format: pcm, ...(voice ? { voice } : {}) },
      },
    },
  };
}

/** One caller turn: the speech in 100 ms appends, then commit. */
export function speechTurn(samples) {
  return [...appendEvents(samples), { type: 'input_audio_buffer.commit' }];
}

/**
 * Every server event of one connection, in order, with its arrival time; `next(type)` waits for the
 * next event of a type not yet consumed, so a test or a client can script a conversation step by step.
 */
export class EventLog {
  constructor(dialect = 'ga', { onEvent } = {}) {
    this.names = DIALECTS[dialect];
    this.events = [];
    this.arrivals = [];
    this.onEvent = onEvent;
    this.cursor = 0;
    this.waiters = [];
    this.closed = null;
  }

  record(event) {
    this.events.push(event);
    this.arrivals.push(performance.now());
    this.onEvent?.(event);
    this.settleWaiters();
  }

  /** The socket closed: waiting for more events would hang, so fail those waits. */
  close(reason = 'the connection closed') {
    this.closed = reason;
    this.settleWaiters();
  }

  /** The next event of `type` after the last one returned by `next`; rejects after `timeoutMs`. */
  next(type, timeoutMs = 15_000) {
    return new Promise((resolve, reject) => {
      const waiter = { type, resolve, reject };
      waiter.timer = setTimeout(() => {
        this.waiters = this.waiters.filter((other) => other !== waiter);
        reject(new Error(`no ${type} within ${timeoutMs} ms; got ${this.types().join(', ') || 'nothing'}`));
      }, timeoutMs);
      this.waiters.push(waiter);
      this.settleWaiters();
    });
  }

  settleWaiters() {
    for (const waiter of [...this.waiters]) {
      const index = this.events.findIndex((event, position) => position >= this.cursor && event.type === waiter.type);
      if (index === -1 && !this.closed) continue;
      clearTimeout(waiter.timer);
      this.waiters = this.waiters.filter((other) => other !== waiter);
      if (index === -1) {
        waiter.reject(new Error(`${this.closed} before ${waiter.type}; got ${this.types().join(', ')}`));
      } else {
        this.cursor = index + 1;
        waiter.resolve(this.events[index]);
      }
    }
  }

  types() {
    return this.events.map((event) => event.type);
  }

  ofType(type) {
    return this.events.filter((event) => event.type === type);
  }

  /** Arrival time (performance.now() ms) of the first event of `type`, or null. */
  firstArrival(type) {
    const index = this.events.findIndex((event) => event.type === type);
    return index === -1 ? null : this.arrivals[index];
  }

  /** The answer of one response: its PCM16 bytes, samples and transcript (deltas and final). */
  answer(responseId) {
    const ofResponse = (type) => this.ofType(type).filter((event) => event.response_id === responseId);
    const bytes = Buffer.concat(ofResponse(this.names.audioDelta).map((event) => Buffer.from(event.delta, 'base64')));
    return {
      bytes,
      samples: pcm16Samples(bytes),
      transcriptDeltas: ofResponse(this.names.transcriptDelta)
        .map((event) => event.delta)
        .join(''),
      transcript: ofResponse(this.names.transcriptDone)[0]?.transcript ?? null,
    };
  }
}
