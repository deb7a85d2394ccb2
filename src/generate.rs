//! Text generation with a key/value cache: greedy at temperature 0, else temperature and nucleus
//! (top-p) sampling with a seeded generator; stops at any end-of-sequence id.

use crate::model::layers::KvCache;
use crate::model::CausalLm;
use crate::rng::Rng;
use crate::Result;
use candle_core::{Tensor, D};

/// Sampling settings.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most tokens to produce.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 picks the most likely token.
    pub temperature: f64,
    /// Nucleus sampling mass (1 keeps the whole distribution).
    pub top_p: f64,
    /// Seed of the sampler.
    pub seed: u64,
    /// Ids that end generation (included in the output when produced).
    pub stop_ids: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            seed: 42,
            stop_ids: Vec::new(),
        }
    }
}

/// Picks the next token from `logits: [vocab]`.
fn sample(logits: &Tensor, opts: &GenerateOptions, rng: &mut Rng) -> Result<u32> {
    if opts.temperature <= 0.0 {
        return Ok(logits.argmax(D::Minus1)?.to_scalar::<u32>()?);
    }
    let probs = candle_nn::ops::softmax_last_dim(&(logits / opts.temperature)?.unsqueeze(0)?)?
        .squeeze(0)?
        .to_vec1::<f32>()?;
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    let mut kept = Vec::new();
    let mut mass = 0f64;
    for &i in &order {
        kept.push(i);
        mass += probs[i] as f64;
        if mass >= opts.top_p {
            break;
        }
    }
    let mut u = rng.next_f64() * mass;
    for &i in &kept {
        u -= probs[i] as f64;
        if u <= 0.0 {
            return Ok(i as u32);
        }
    }
    Ok(*kept.last().unwrap_or(&0) as u32)
}

/// Continues `prompt` (token ids) and returns the new tokens only.
pub fn generate(model: &CausalLm, prompt: &[u32], opts: &GenerateOptions) -> Result<Vec<u32>> {
    crate::ops::graft::without_grad(|| generate_tokens(model, prompt, opts))
}

fn generate_tokens(model: &CausalLm, prompt: &[u32], opts: &GenerateOptions) -> Result<Vec<u32>> {
    let mut caches: Vec<KvCache> = vec![None; model.layers.len()];
    let mut rng = Rng::new(opts.seed);
    let mut out = Vec::new();
    let mut input: Vec<u32> = prompt.to_vec();
    let mut position = 0u32;
    let long_from = model.rope_long_from().map(|n| n as u32);
    for _ in 0..opts.max_new_tokens {
        // LongRoPE: when the sequence grows past the original context every position rotates
        // with the long frequencies, so the keys cached with the short ones are recomputed (as
        // transformers' Phi-3 drops its cache there).
        if long_from
            .is_some_and(|n| position > 0 && position <= n && position + input.len() as u32 > n)
        {
            caches = vec![None; model.layers.len()];
            input = prompt.iter().chain(&out).copied().collect();
            position = 0;
        }
        let len = input.len() as u32;
        let ids = Tensor::new(input.as_slice(), &model.device)?.unsqueeze(0)?;
        let positions = vec![(position..position + len).collect::<Vec<u32>>()];
        let hidden = model.forward_hidden(&ids, &positions, None, None, Some(&mut caches), None)?;
        let last = hidden.squeeze(0)?.get(len as usize - 1)?;
        let next = sample(&model.logits(&last)?, opts, &mut rng)?;
        position += len;
        out.push(next);
        if opts.stop_ids.contains(&next) {
            break;
        }
        input = vec![next];
    }
    Ok(out)
}
