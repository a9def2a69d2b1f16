//! The model's weights under the names and layouts HF checkpoints use, for the
//! model a full fine-tune writes: what the engine keeps apart but the family
//! stores fused goes back together (phi3's `qkv_proj` and `gate_up_proj`, rows
//! in `Model::stored_as`'s order), and mixtral's experts are stacked as
//! transformers 5 stores them (`mlp.experts.gate_up_proj` `[E, 2·ffn, hidden]`,
//! `mlp.experts.down_proj` `[E, hidden, ffn]`).

use std::collections::HashMap;

use candle_core::Tensor;
use vicugna_engine::Model;

use crate::error::{Result, TrainError};

/// Where one engine tensor goes in the checkpoint.
enum Place {
    /// Under this name, as it is.
    Same,
    /// Rows `start..` of a fused tensor.
    Fused { name: String, start: usize },
    /// Expert `e`'s part of a stacked tensor; `part` orders gate before up.
    Expert { name: String, e: usize, part: usize },
}

fn place(model: &Model, name: &str) -> Place {
    let (module, suffix) = match name.rsplit_once('.') {
        Some((m, s @ ("weight" | "bias"))) => (m, s),
        _ => return Place::Same,
    };
    if let Some((fused, start, _)) = model.stored_as(module) {
        return Place::Fused {
            name: format!("{fused}.{suffix}"),
            start,
        };
    }
    // model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight
    if let Some((layer, rest)) = module.split_once(".mlp.experts.") {
        if let Some((e, proj)) = rest.split_once('.') {
            if let Ok(e) = e.parse::<usize>() {
                let (stack, part) = match proj {
                    "gate_proj" => ("gate_up_proj", 0),
                    "up_proj" => ("gate_up_proj", 1),
                    "down_proj" => ("down_proj", 0),
                    _ => return Place::Same,
                };
                return Place::Expert {
                    name: format!("{layer}.mlp.experts.{stack}"),
                    e,
                    part,
                };
            }
        }
    }
    Place::Same
}

/// `tensors` (engine names, as [`Model::named_weights`] gives them) under the
/// checkpoint's names, in the order their first part comes.
pub fn to_checkpoint_names(model: &Model, tensors: &[(String, Tensor)]) -> Result<Vec<(String, Tensor)>> {
    enum Slot {
        Done(Tensor),
        /// (first row, rows)
        Fused(Vec<(usize, Tensor)>),
        /// (expert, part, matrix)
        Experts(Vec<(usize, usize, Tensor)>),
    }
    let mut order: Vec<String> = Vec::new();
    let mut slots: HashMap<String, Slot> = HashMap::new();
    for (name, t) in tensors {
        let (key, fresh) = match place(model, name) {
            Place::Same => (name.clone(), Slot::Done(t.clone())),
            Place::Fused { name, start } => (name, Slot::Fused(vec![(start, t.clone())])),
            Place::Expert { name, e, part } => (name, Slot::Experts(vec![(e, part, t.clone())])),
        };
        match (slots.get_mut(&key), fresh) {
            (Some(Slot::Fused(v)), Slot::Fused(mut more)) => v.append(&mut more),
            (Some(Slot::Experts(v)), Slot::Experts(mut more)) => v.append(&mut more),
            (Some(_), _) => {
                return Err(TrainError::setting(
                    "model",
                    format!("{key}: two weights would be saved under this name"),
                ))
            }
            (None, fresh) => {
                order.push(key.clone());
                slots.insert(key, fresh);
            }
        }
    }
    let mut out = Vec::with_capacity(order.len());
    for name in order {
        let t = match slots.remove(&name) {
            Some(Slot::Done(t)) => t,
            Some(Slot::Fused(mut parts)) => {
                parts.sort_by_key(|(start, _)| *start);
                let parts: Vec<Tensor> = parts.into_iter().map(|(_, t)| t).collect();
                Tensor::cat(&parts, 0)?
            }
            Some(Slot::Experts(mut parts)) => {
                parts.sort_by_key(|(e, part, _)| (*e, *part));
                let experts = parts.last().map_or(0, |(e, _, _)| e + 1);
                let mut each = Vec::with_capacity(experts);
                for e in 0..experts {
                    let mine: Vec<Tensor> = parts.iter().filter(|p| p.0 == e).map(|p| p.2.clone()).collect();
                    if mine.is_empty() {
                        return Err(TrainError::setting(
                            "model",
                            format!("{name}: expert {e} has no weights"),
                        ));
                    }
                    each.push(Tensor::cat(&mine, 0)?);
                }
                Tensor::stack(&each, 0)?
            }
            None => continue,
        };
        out.push((name, t));
    }
    Ok(out)
}
