//! The `vicugna` command: one binary for chatting with, serving, training and
//! evaluating LLM chatbots.

mod bench;
mod chat_cmd;
mod classify_cmd;
mod data_cmd;
mod eval_cmd;
mod eval_local;
mod generate;
mod leaderboard;
mod model_arg;
mod serve_cmd;
mod template;
mod tokenize_cmd;
mod train_cmd;
mod weights_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "vicugna", version, about = "Train, serve and evaluate LLM chatbots")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve models: controller, a worker and the OpenAI-compatible gateway on this machine.
    Serve(serve_cmd::ServeArgs),
    /// Run a controller: it tracks which worker serves which model (FastChat protocol).
    Controller(serve_cmd::ControllerArgs),
    /// Run a model worker that registers with a controller.
    Worker(serve_cmd::WorkerArgs),
    /// Run the OpenAI-compatible API in front of a controller.
    Api(serve_cmd::ApiArgs),
    /// Chat with a model in the terminal.
    Chat(chat_cmd::ChatArgs),
    /// Generate text from a prompt (streams it; --json prints one object).
    Generate(generate::GenerateArgs),
    /// Measure load time, prefill and decode speed, and peak memory.
    Bench(bench::BenchArgs),
    /// Arena ratings (Elo, 95% intervals, win fractions) from the web page's vote logs.
    Leaderboard(leaderboard::LeaderboardArgs),
    /// Label texts with a model (CARP, vanilla or chain-of-thought; zero- or few-shot).
    Classify(classify_cmd::ClassifyArgs),
    /// List or render conversation templates.
    #[command(subcommand)]
    Template(template::TemplateCommand),
    /// Evaluate chatbots with an LLM judge: answer, judge, show, review (MT-bench / Vicuna-80).
    #[command(subcommand)]
    Eval(eval_cmd::EvalCommand),
    /// Apply or make a weight delta (tensor by tensor, low memory).
    #[command(subcommand)]
    Delta(weights_cmd::DeltaCommand),
    /// Merge LoRA adapters into a base model.
    #[command(subcommand)]
    Lora(weights_cmd::LoraCommand),
    /// Convert weights: HF safetensors <-> GGUF, dtype (f32/f16/bf16), quantize (q8_0/q4_0/q4_k).
    Convert(weights_cmd::ConvertArgs),
    /// Prepare training data (ShareGPT JSON): clean, split, filter, stats, sample, merge, inspect.
    #[command(subcommand)]
    Data(data_cmd::DataCommand),
    /// Fine-tune a model (full or LoRA) on conversations; resumable.
    Train(train_cmd::TrainArgs),
    /// Print the token ids of a text (no BOS/EOS unless --special).
    Tokenize(tokenize_cmd::TokenizeArgs),
    /// Print the text of token ids.
    Detokenize(tokenize_cmd::DetokenizeArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(a) => serve_cmd::run_serve(a),
        Command::Controller(a) => serve_cmd::run_controller(a),
        Command::Worker(a) => serve_cmd::run_worker(a),
        Command::Api(a) => serve_cmd::run_api(a),
        Command::Chat(a) => chat_cmd::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Leaderboard(a) => leaderboard::run(a),
        Command::Template(c) => template::run(c),
        Command::Eval(c) => eval_cmd::run(c),
        Command::Delta(c) => weights_cmd::run_delta(c),
        Command::Lora(c) => weights_cmd::run_lora(c),
        Command::Convert(a) => weights_cmd::run_convert(a),
        Command::Classify(a) => classify_cmd::run(a),
        Command::Data(c) => data_cmd::run(c),
        Command::Train(a) => train_cmd::run(a),
        Command::Tokenize(a) => tokenize_cmd::run_tokenize(a),
        Command::Detokenize(a) => tokenize_cmd::run_detokenize(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
