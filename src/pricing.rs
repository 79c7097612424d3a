//! What calls cost: token usage from the answers times the `[prices]`
//! table, at realtime and at batch or flex prices. Pure arithmetic, shared
//! by the savings ledger, the savings metric and `carpool demo`.

use std::ops::AddAssign;

use serde_json::Value;

use crate::config::ModelPrice;
use crate::model::ServedBy;

/// Tokens of one answer, or a sum of answers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenUsage {
    pub prompt: u64,
    pub completion: u64,
}

impl TokenUsage {
    /// The `usage` object of an answer body: `prompt_tokens` and
    /// `completion_tokens` (chat, embeddings, both dialects), or
    /// `input_tokens` and `output_tokens` (OpenAI's Responses API).
    pub fn from_answer(body: &Value) -> Option<Self> {
        let usage = body.get("usage")?;
        let count = |chat: &str, responses: &str| {
            usage
                .get(chat)
                .or_else(|| usage.get(responses))
                .and_then(Value::as_u64)
        };
        Some(Self {
            prompt: count("prompt_tokens", "input_tokens")?,
            completion: count("completion_tokens", "output_tokens").unwrap_or(0),
        })
    }

    /// The `usage` of an answer body given as bytes, reading nothing else.
    pub fn from_body(body: &[u8]) -> Option<Self> {
        #[derive(serde::Deserialize)]
        struct Body {
            usage: Option<Usage>,
        }
        #[derive(serde::Deserialize)]
        struct Usage {
            prompt_tokens: Option<u64>,
            completion_tokens: Option<u64>,
            /// The Responses API's names for the same counts.
            input_tokens: Option<u64>,
            output_tokens: Option<u64>,
        }
        let usage = serde_json::from_slice::<Body>(body).ok()?.usage?;
        Some(Self {
            prompt: usage.prompt_tokens.or(usage.input_tokens)?,
            completion: usage.completion_tokens.or(usage.output_tokens).unwrap_or(0),
        })
    }

    pub fn total(&self) -> u64 {
        self.prompt + self.completion
    }
}

impl AddAssign for TokenUsage {
    fn add_assign(&mut self, other: Self) {
        self.prompt += other.prompt;
        self.completion += other.completion;
    }
}

/// USD for the same tokens at both prices.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cost {
    pub realtime: f64,
    pub batch: f64,
}

impl Cost {
    pub fn savings(&self) -> f64 {
        self.realtime - self.batch
    }

    /// Savings as a fraction of the realtime price (0 when nothing was spent).
    pub fn savings_fraction(&self) -> f64 {
        if self.realtime > 0.0 {
            self.savings() / self.realtime
        } else {
            0.0
        }
    }

    /// The same cost for `to` calls instead of `from` (e.g. per million).
    pub fn scaled(&self, from: u64, to: u64) -> Self {
        if from == 0 {
            return Self::default();
        }
        let k = to as f64 / from as f64;
        Self {
            realtime: self.realtime * k,
            batch: self.batch * k,
        }
    }
}

impl AddAssign for Cost {
    fn add_assign(&mut self, other: Self) {
        self.realtime += other.realtime;
        self.batch += other.batch;
    }
}

const PER_MILLION: f64 = 1_000_000.0;

/// USD at realtime prices: `input` and `output` are USD per million tokens.
pub fn realtime_cost(usage: TokenUsage, input: f64, output: f64) -> f64 {
    usage.prompt as f64 * input / PER_MILLION + usage.completion as f64 * output / PER_MILLION
}

/// The batch price of something that costs `realtime` USD.
pub fn batch_cost(realtime: f64, batch_discount: f64) -> f64 {
    realtime * (1.0 - batch_discount)
}

/// `usage` priced by one `[[prices.models]]` entry.
pub fn cost_of(usage: TokenUsage, price: &ModelPrice) -> Cost {
    let realtime = realtime_cost(usage, price.input, price.output);
    Cost {
        realtime,
        batch: batch_cost(realtime, price.batch_discount),
    }
}

/// Nano-USD (10^-9 USD) in one USD. The ledger counts in whole nano-USD,
/// so that millions of requests add up exactly; one token of the cheapest
/// model costs tens of them.
pub const NANO_PER_USD: f64 = 1_000_000_000.0;

/// What one answered request was charged for: its own usage, priced at
/// realtime and at the tier that served it, in nano-USD. Written to the
/// ledger once, when the result is stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Charge {
    pub usage: TokenUsage,
    pub realtime_nusd: i64,
    pub served_nusd: i64,
}

impl Charge {
    /// `usage` served by `served`, priced by `price` (none: tokens only,
    /// no money either way).
    pub fn of(usage: TokenUsage, price: Option<&ModelPrice>, served: ServedBy) -> Self {
        let Some(price) = price else {
            return Self {
                usage,
                ..Self::default()
            };
        };
        let realtime = realtime_cost(usage, price.input, price.output);
        let served = match served {
            ServedBy::Batch => batch_cost(realtime, price.batch_discount),
            ServedBy::Flex => batch_cost(realtime, price.flex_discount),
            ServedBy::Realtime => realtime,
        };
        Self {
            usage,
            realtime_nusd: nano(realtime),
            served_nusd: nano(served),
        }
    }

    /// USD saved against the realtime price.
    pub fn saved_usd(&self) -> f64 {
        (self.realtime_nusd - self.served_nusd) as f64 / NANO_PER_USD
    }
}

/// USD as whole nano-USD, rounded to the nearest.
fn nano(usd: f64) -> i64 {
    // Saturating: a price table cannot make a count wrap.
    (usd * NANO_PER_USD).round() as i64
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::Pattern;

    fn price(input: f64, output: f64, discount: f64) -> ModelPrice {
        ModelPrice {
            model: Pattern::new("m-*").unwrap(),
            upstream: None,
            input,
            output,
            batch_discount: discount,
            flex_discount: discount,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn realtime_cost_is_tokens_times_price_per_million() {
        let usage = TokenUsage {
            prompt: 2_000_000,
            completion: 500_000,
        };
        assert!(close(realtime_cost(usage, 0.1, 0.3), 0.2 + 0.15));
    }

    #[test]
    fn batch_cost_takes_the_discount_off() {
        assert!(close(batch_cost(10.0, 0.5), 5.0));
        assert!(close(batch_cost(10.0, 0.0), 10.0));
        assert!(close(batch_cost(10.0, 0.25), 7.5));
    }

    #[test]
    fn cost_of_uses_the_entrys_own_discount_and_savings_are_the_difference() {
        let usage = TokenUsage {
            prompt: 1_000_000,
            completion: 1_000_000,
        };
        let cost = cost_of(usage, &price(1.0, 3.0, 0.5));
        assert!(close(cost.realtime, 4.0));
        assert!(close(cost.batch, 2.0));
        assert!(close(cost.savings(), 2.0));
        assert!(close(cost.savings_fraction(), 0.5));
    }

    #[test]
    fn a_charge_prices_the_tier_that_served_in_whole_nano_usd() {
        let usage = TokenUsage {
            prompt: 1_234,
            completion: 567,
        };
        let mut p = price(0.15, 0.6, 0.5);
        p.flex_discount = 0.4;
        // 1234 * 0.15 / 1e6 + 567 * 0.6 / 1e6 = 0.0005253 USD.
        let batch = Charge::of(usage, Some(&p), ServedBy::Batch);
        assert_eq!(batch.realtime_nusd, 525_300);
        assert_eq!(batch.served_nusd, 262_650);
        assert_eq!(
            Charge::of(usage, Some(&p), ServedBy::Flex).served_nusd,
            315_180
        );
        let realtime = Charge::of(usage, Some(&p), ServedBy::Realtime);
        assert_eq!(realtime.served_nusd, realtime.realtime_nusd);
        assert!(close(realtime.saved_usd(), 0.0));
        assert!(close(batch.saved_usd(), 0.000_262_65));
        let unpriced = Charge::of(usage, None, ServedBy::Batch);
        assert_eq!(
            (unpriced.usage, unpriced.realtime_nusd, unpriced.served_nusd),
            (usage, 0, 0)
        );
    }

    #[test]
    fn no_tokens_cost_nothing_and_save_nothing() {
        let cost = cost_of(TokenUsage::default(), &price(1.0, 3.0, 0.5));
        assert_eq!(cost, Cost::default());
        assert!(close(cost.savings_fraction(), 0.0));
    }

    #[test]
    fn costs_and_usages_add_up() {
        let mut total = Cost::default();
        total += Cost {
            realtime: 1.0,
            batch: 0.5,
        };
        total += Cost {
            realtime: 2.0,
            batch: 1.0,
        };
        assert!(close(total.realtime, 3.0) && close(total.batch, 1.5));
        let mut usage = TokenUsage::default();
        usage += TokenUsage {
            prompt: 3,
            completion: 4,
        };
        usage += TokenUsage {
            prompt: 1,
            completion: 1,
        };
        assert_eq!(usage.total(), 9);
    }

    #[test]
    fn scaling_to_a_million_calls_is_proportional() {
        let cost = Cost {
            realtime: 0.003,
            batch: 0.0015,
        };
        let per_million = cost.scaled(300, 1_000_000);
        assert!(close(per_million.realtime, 10.0));
        assert!(close(per_million.batch, 5.0));
        assert_eq!(cost.scaled(0, 10), Cost::default());
    }

    #[test]
    fn usage_is_read_from_an_answer_body() {
        let body =
            json!({"usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}});
        assert_eq!(
            TokenUsage::from_answer(&body),
            Some(TokenUsage {
                prompt: 12,
                completion: 7
            })
        );
        assert_eq!(TokenUsage::from_answer(&json!({"id": "x"})), None);
    }

    #[test]
    fn responses_usage_is_read_from_both_forms() {
        let body = json!({"object": "response", "usage": {"input_tokens": 21, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 9, "output_tokens_details": {"reasoning_tokens": 2}, "total_tokens": 30}});
        let expected = Some(TokenUsage {
            prompt: 21,
            completion: 9,
        });
        assert_eq!(TokenUsage::from_answer(&body), expected);
        assert_eq!(TokenUsage::from_body(body.to_string().as_bytes()), expected);
        let chat = json!({"usage": {"prompt_tokens": 4, "completion_tokens": 1}});
        assert_eq!(
            TokenUsage::from_body(chat.to_string().as_bytes()),
            Some(TokenUsage {
                prompt: 4,
                completion: 1
            })
        );
        assert_eq!(TokenUsage::from_body(br#"{"usage":{}}"#), None);
    }
}
